"""Property-based tests (hypothesis) of LDB's pure functions and its two mechanisms."""

from __future__ import annotations

import random
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ldb.layers import discover_layers, select_candidates
from lightning_ldb.schedule import draw_dropped
from lightning_ldb.schedule import is_drop_epoch
from lightning_ldb.dropping import ParameterFreezer
from lightning_ldb.layers import Layer
from lightning_ldb.lr_scaling import StepLRScaler
from lightning_ldb.batching import optimizer_steps_per_epoch

FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------ is_drop_epoch
@FAST
@given(n=st.integers(1, 300), every=st.integers(1, 40))
def test_schedule_counts_and_spacing(n, every):
    drops = [e for e in range(n) if is_drop_epoch(e, every)]
    assert len(drops) == (n - 1) // every
    assert 0 not in drops
    assert drops == list(range(every, n, every))  # evenly spaced, starting at `every`


# ------------------------------------------------------------------ select_candidates
NAMES = ["stem", "stem.bn", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "head", "head.norm", "fc"]
PATTERNS = st.sampled_from(["*", "layer*", "layer1.*", "*.0", "*.1", "head*", "stem", "fc", "layer[23].*", "nope"])


@st.composite
def layer_lists(draw):
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    return [Layer(name, ()) for name in names]


@FAST
@given(
    layers=layer_lists(),
    keep_first=st.integers(0, 12),
    keep_last=st.integers(0, 12),
    include=st.none() | st.lists(PATTERNS, min_size=1, max_size=3),
    exclude=st.none() | st.lists(PATTERNS, min_size=1, max_size=3),
)
def test_candidates_respect_keeps_order_and_patterns(layers, keep_first, keep_last, include, exclude):
    candidates = select_candidates(layers, keep_first, keep_last, include, exclude)
    names = [layer.name for layer in layers]
    kept = set(names[:keep_first]) | set(names[max(0, len(names) - keep_last) :])
    chosen = [layer.name for layer in candidates]
    assert not set(chosen) & kept
    assert chosen == [n for n in names if n in set(chosen)]  # a subsequence, in network order
    for name in names:
        if name in kept:
            continue
        included = include is None or any(fnmatchcase(name, p) for p in include)
        excluded = exclude is not None and any(fnmatchcase(name, p) for p in exclude)
        assert (name in chosen) == (included and not excluded), name
    if include is None and exclude is None:
        assert len(chosen) == max(0, len(names) - keep_first - keep_last)


# ------------------------------------------------------------------ discover_layers
@st.composite
def models(draw):
    """Nested Sequentials of Linear/BatchNorm/activation layers, some modules reused and some weights tied."""
    pool: list[nn.Module] = []
    linears: list[nn.Linear] = []

    def block(depth):
        children = []
        for _ in range(draw(st.integers(1, 4))):
            kinds = ["linear", "bn", "act"] + (["reuse", "nest"] if depth < 2 else [])
            kind = draw(st.sampled_from(kinds))
            if kind == "nest":
                children.append(block(depth + 1))
            elif kind == "reuse" and pool:
                children.append(draw(st.sampled_from(pool)))  # the same module object twice
            elif kind == "bn":
                children.append(nn.BatchNorm1d(4))
            elif kind == "act":
                children.append(nn.ReLU())
            else:
                linear = nn.Linear(4, 4, bias=draw(st.booleans()))
                if linears and draw(st.booleans()):
                    linear.weight = draw(st.sampled_from(linears)).weight  # tied across modules
                linears.append(linear)
                children.append(linear)
            pool.append(children[-1])
        return nn.Sequential(*children)

    return block(0)


@FAST
@given(model=models(), granularity=st.sampled_from(["module", "parameter"]))
def test_every_parameter_is_in_a_layer_and_a_shared_one_in_each_of_its_modules(model, granularity):
    layers = discover_layers(model, granularity)
    ids = [id(p) for layer in layers for p in layer.parameters]
    unique = list(model.parameters())  # parameters() yields a shared parameter once
    assert set(ids) == {id(p) for p in unique}
    assert all(len({id(p) for p in layer.parameters}) == len(layer.parameters) for layer in layers)
    if granularity == "parameter":
        assert len(ids) == len(set(ids))
    else:
        owners = [(name, p) for name, m in model.named_modules() for p in m.parameters(recurse=False)]
        assert len(ids) == len(owners)  # a tied parameter is listed with every module that holds it
    assert all(layer.parameters for layer in layers)
    if granularity == "parameter":
        assert [layer.name for layer in layers] == [name for name, _ in model.named_parameters()]
    else:
        order = [name for name, _ in model.named_modules()]
        assert [layer.name for layer in layers] == [n for n in order if n in {layer.name for layer in layers}]


# ------------------------------------------------------------------ draw_dropped
@FAST
@given(
    n=st.integers(0, 300),
    rate=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 10_000),
    step=st.none() | st.integers(0, 10**6),
)
def test_draws_are_deterministic_sized_and_leave_global_rngs_alone(n, rate, seed, epoch, step):
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    flags = draw_dropped(n, rate, seed, epoch, step)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert isinstance(flags, tuple) and len(flags) == n and all(type(f) is bool for f in flags)
    assert flags == draw_dropped(n, rate, seed, epoch, step)
    assert not any(draw_dropped(n, 0.0, seed, epoch, step))
    # A higher drop rate only adds layers to the same draw: ablations over p are nested.
    higher = draw_dropped(n, rate + (1.0 - rate) / 2, seed, epoch, step)  # in [rate, 1), also for rate near 1
    assert all(h for f, h in zip(flags, higher) if f)


# ------------------------------------------------------------------ optimizer_steps_per_epoch
def brute_force_steps(samples: int, batch_size: int, drop_last: bool, limit, accumulate: int) -> int:
    """Count the batches of a real DataLoader, cut them as Lightning's ``limit_train_batches`` does, and step
    as Lightning's accumulation does: after every ``accumulate`` batches, and after an epoch's last batch."""
    loader = DataLoader(TensorDataset(torch.zeros(samples)), batch_size=batch_size, drop_last=drop_last)
    batches = sum(1 for _ in loader)
    batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    return sum(1 for i in range(batches) if (i + 1) % accumulate == 0 or i + 1 == batches)


LIMITS = st.integers(1, 40) | st.floats(0.05, 1.0)


@settings(max_examples=80, deadline=None)
@given(
    samples=st.integers(1, 300),
    batch_size=st.integers(1, 64),
    drop_last=st.booleans(),
    limit=LIMITS,
    accumulate=st.integers(1, 6),
)
def test_steps_per_epoch_match_a_real_loader(samples, batch_size, drop_last, limit, accumulate):
    assume(not (drop_last and samples < batch_size))  # an empty epoch: Lightning trains nothing at all
    expected = brute_force_steps(samples, batch_size, drop_last, limit, accumulate)
    assume(expected > 0)  # a float limit that keeps no batch is an error in Lightning
    assert optimizer_steps_per_epoch(samples, batch_size, drop_last, limit, accumulate) == expected


@FAST
@given(
    samples=st.integers(1, 500),
    sizes=st.lists(st.integers(1, 128), min_size=2, max_size=5, unique=True),
    drop_last=st.booleans(),
    limit=LIMITS,
    accumulate=st.integers(1, 6),
)
def test_steps_per_epoch_never_grow_with_the_batch_size(samples, sizes, drop_last, limit, accumulate):
    steps = [optimizer_steps_per_epoch(samples, b, drop_last, limit, accumulate) for b in sorted(sizes)]
    assert steps == sorted(steps, reverse=True)


# ------------------------------------------------------------------ ParameterFreezer
@st.composite
def freeze_scenarios(draw):
    n = draw(st.integers(1, 12))
    initial = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    calls = draw(st.lists(st.lists(st.integers(0, n - 1)), min_size=1, max_size=4))  # repeats allowed
    unfrozen_by_others = draw(st.lists(st.integers(0, n - 1), unique=True))
    return initial, calls, unfrozen_by_others


@FAST
@given(scenario=freeze_scenarios())
def test_freezer_restores_exactly_the_flags_it_found(scenario):
    initial, calls, unfrozen_by_others = scenario
    params = [nn.Parameter(torch.ones(2), requires_grad=flag) for flag in initial]
    for p in params:
        p.grad = torch.ones(2) if p.requires_grad else None
    freezer = ParameterFreezer()
    selected: set[int] = set()
    for call in calls:
        newly = {i for i in set(call) if params[i].requires_grad}
        assert freezer.freeze(params[i] for i in call) == len(newly)
        selected |= set(call)
        for i in selected:  # every selected parameter is frozen, without a gradient
            assert not params[i].requires_grad and params[i].grad is None
        for i in set(range(len(params))) - selected:
            assert params[i].requires_grad == initial[i]
    freezer.restore()
    assert [p.requires_grad for p in params] == initial
    assert freezer.frozen == ()

    # Someone else (BackboneFinetuning) unfreezes some parameters between two freezes of the same set: LDB drops
    # them again, and on restore they are trainable, as that someone asked.
    everything = [i for call in calls for i in call]
    freezer.freeze(params[i] for i in everything)
    for i in unfrozen_by_others:
        params[i].requires_grad_(True)
    freezer.freeze(params[i] for i in everything)
    assert all(not params[i].requires_grad for i in everything)
    freezer.restore()
    assert [p.requires_grad for p in params] == [flag or i in unfrozen_by_others for i, flag in enumerate(initial)]


# ------------------------------------------------------------------ StepLRScaler
# torch wraps each optimizer class's own ``step`` with the step hooks once an instance exists. With SGD's wrapped
# too, a subclass whose ``step`` calls ``super().step()`` runs every hook twice, nested; that must not scale twice.
torch.optim.SGD([nn.Parameter(torch.ones(1))])


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that records the lrs its step saw, and raises if told to; its step calls ``super().step()``."""

    def __init__(self, groups, fail: bool) -> None:
        super().__init__(groups)
        self.fail, self.seen = fail, []

    def step(self, closure=None):
        self.seen.append([group["lr"] for group in self.param_groups])
        if self.fail:
            raise RuntimeError("boom")
        return super().step(closure)


@FAST
@given(
    lrs=st.lists(st.floats(1e-6, 10.0), min_size=1, max_size=4),
    scale=st.floats(0.01, 100.0),
    fail=st.booleans(),
)
def test_lr_is_scaled_inside_step_only_and_always_put_back(lrs, scale, fail):
    groups = [{"params": [nn.Parameter(torch.ones(1))], "lr": lr} for lr in lrs]
    for group in groups:
        group["params"][0].grad = torch.ones(1)
    optimizer = RecordingSGD(groups, fail)
    seen_before_step = []
    scaler = StepLRScaler(before_step=lambda opt: seen_before_step.append(opt))
    scaler.attach([optimizer])
    scaler.scale = scale
    if fail:
        with pytest.raises(RuntimeError):
            optimizer.step()
        scaler.detach()  # what the callback does on an exception
    else:
        optimizer.step()
    assert optimizer.seen == [[lr * scale for lr in lrs]]  # scaled once, though the hooks ran nested
    assert [group["lr"] for group in optimizer.param_groups] == lrs  # bitwise the values set
    assert seen_before_step == [optimizer]
    if not fail:
        scaler.detach()
        optimizer.step()  # detached: no scaling any more
        assert optimizer.seen[-1] == lrs

"""``LayerDropBack`` in a plain PyTorch loop: the callback's guarantees without the Trainer.

Same draws and the same weights as the callback for the same seed; dropped parameters bitwise unchanged and kept
ones moving; the LR scaled only inside ``step()``; everything restored when the epoch's block exits, also on error.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pytest
import torch
from helpers import TinyMLP, make_dataset, make_trainer, snapshot
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_ldb import LayerDropBack, LayerDropBackCallback

KWARGS: dict[str, Any] = dict(drop_rate=0.5, every=2, keep_first=2, keep_last=1, seed=3, batch_scale=1)


def new_model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)


def plain_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ldb: LayerDropBack,
    epochs: int,
    start: int = 0,
    on_epoch: Optional[Any] = None,
) -> dict[int, tuple[int, tuple[str, ...]]]:
    """The README's loop over TinyMLP's data; returns, per optimizer step, (epoch, layers dropped in its forward)."""
    draws: dict[int, tuple[int, tuple[str, ...]]] = {}
    current = {"epoch": start}
    # Recorded after the forward: with resample="step" the step's draw is applied just before it.
    def record(*_: Any) -> None:
        draws.setdefault(ldb.steps, (current["epoch"], ldb.dropped_layers))

    handle = model.register_forward_hook(record)
    data = make_dataset(64)
    for epoch in range(start, epochs):
        current["epoch"] = epoch
        loader = DataLoader(data, batch_size=ldb.batch_size(16, epoch))
        with ldb.epoch(epoch):
            for x, y in loader:
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            if on_epoch is not None:
                on_epoch(epoch)
    handle.remove()
    return draws


class StepDraws(Callback):
    def __init__(self, ldb: LayerDropBackCallback) -> None:
        self.ldb = ldb
        self.draws: dict[int, tuple[int, tuple[str, ...]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draws[trainer.global_step] = (trainer.current_epoch, self.ldb.dropped_layers)


@pytest.mark.parametrize("resample", ["epoch", "step"])
def test_the_plain_loop_draws_and_trains_exactly_like_the_callback(resample):
    callback = LayerDropBackCallback(**KWARGS, resample=resample)
    log = StepDraws(callback)
    trained = new_model()
    make_trainer(5, [callback, log]).fit(trained)

    model = new_model()
    optimizer = sgd(model)
    draws = plain_loop(model, optimizer, LayerDropBack(model, optimizer, **KWARGS, resample=resample), 5)
    assert draws == log.draws
    assert any(dropped for _, dropped in draws.values())
    if resample == "step":
        assert len({dropped for epoch, dropped in draws.values() if epoch == 2}) > 1  # a draw per step
    for name, param in model.named_parameters():
        assert torch.equal(param, trained.get_submodule("").get_parameter(name)), name


def test_dropped_parameters_stay_bitwise_unchanged_and_kept_ones_move():
    model = new_model()
    optimizer = sgd(model)
    ldb = LayerDropBack(model, optimizer, **KWARGS)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    dropped: dict[int, tuple[str, ...]] = {}

    def at_epoch_end(epoch: int) -> None:  # still inside the epoch's block
        weights[epoch], dropped[epoch] = snapshot(model), ldb.dropped_layers

    plain_loop(model, optimizer, ldb, 3, on_epoch=at_epoch_end)
    assert dropped[2] and dropped[1] == ()
    dropped_params = {f"{layer}.{kind}" for layer in dropped[2] for kind in ("weight", "bias")}
    for name, value in weights[2].items():
        assert torch.equal(value, weights[1][name]) == (name in dropped_params), name
    assert all(p.requires_grad for p in model.parameters())  # released on exit


def test_the_lr_is_scaled_inside_step_only_and_the_batch_on_drop_epochs():
    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ldb = LayerDropBack(model, optimizer, lr_scale=3.0, batch_scale=2, every=2, keep_first=2, seed=0)
    inside: dict[int, set[float]] = {}
    outside: dict[int, set[float]] = {}
    optimizer.register_step_pre_hook(lambda opt, *_: inside.setdefault(epoch, set()).add(opt.param_groups[0]["lr"]))
    for epoch in range(3):
        with ldb.epoch(epoch):
            for _ in range(2):
                model(torch.randn(4, 8)).sum().backward()
                outside.setdefault(epoch, set()).add(optimizer.param_groups[0]["lr"])
                optimizer.step()
                optimizer.zero_grad()
    assert inside == {0: {0.1}, 1: {0.1}, 2: {0.1 * 3.0}}
    assert outside == {0: {0.1}, 1: {0.1}, 2: {0.1}}
    assert [ldb.batch_size(64, e) for e in range(5)] == [64, 64, 128, 64, 128]


@pytest.mark.parametrize("backward", ["weights", "block"])
def test_an_error_inside_the_epoch_restores_every_flag_hook_and_lr(backward, recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), *[Residual() for _ in range(4)], nn.Linear(4, 1))
    model[2].fc.requires_grad_(False)  # the user's own freeze stays
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    branches = {"*.fc": []} if backward == "block" else None
    ldb = LayerDropBack(model, optimizer, drop_rate=0.9, keep_first=1, keep_last=1, seed=0, backward=backward,
                        branches=branches)  # fmt: skip
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with ldb.epoch(2):
            assert ldb.dropped_layers
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            raise RuntimeError("boom")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert optimizer.param_groups[0]["lr"] == 0.1 and ldb.dropped_layers == ()
    # No detach hook is left: the input gradient flows through every branch again.
    x = torch.randn(2, 4, requires_grad=True)
    model[1](x).sum().backward()
    assert torch.equal(x.grad, (torch.ones(2, 4) + torch.ones(2, 4) @ model[1].fc.weight))
    ldb.close()
    optimizer.step()  # after close, step() is the optimizer's own
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert warned(recwarn) == [BEFORE_A_STEP]  # a DROP epoch entered before any step: registration order


#: The engine's warnings that tests entering a DROP epoch directly trigger on purpose (fragments).
NO_OPTIMIZER, BEFORE_A_STEP = "no optimizer is hooked", "draws before LDB has seen a training step"


def warned(recorder: pytest.WarningsRecorder) -> list[str]:
    """Which of the two warnings were raised, in order."""
    messages = [str(w.message) for w in recorder]
    return [fragment for m in messages for fragment in (NO_OPTIMIZER, BEFORE_A_STEP) if fragment in m]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


def test_block_mode_skips_the_dropped_branch_and_keeps_the_forward(recwarn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), *[Residual() for _ in range(4)], nn.Linear(4, 1))
    ldb = LayerDropBack(model, (), drop_rate=0.5, keep_first=1, keep_last=1, seed=1, backward="block",
                        branches={"*.fc": []})  # fmt: skip
    x = torch.randn(3, 4)
    expected = model(x)
    with ldb.epoch(2):
        dropped = ldb.dropped_layers
        assert 0 < len(dropped) < len(ldb.candidate_layers)
        out = model(x)
        out.sum().backward()
    assert torch.equal(out, expected)  # the forward is unchanged
    for name in ldb.candidate_layers:  # the backward skipped every dropped branch, and only those
        assert (model.get_submodule(name).weight.grad is None) == (name in dropped), name
    assert warned(recwarn) == [NO_OPTIMIZER, BEFORE_A_STEP]  # as intended here: no optimizer, no step before


def test_state_dict_continues_the_draws_of_an_interrupted_plain_loop():
    model = new_model()
    optimizer = sgd(model)
    reference = plain_loop(model, optimizer, LayerDropBack(model, optimizer, **KWARGS, resample="step"), 5)

    model = new_model()
    optimizer = sgd(model)
    first = LayerDropBack(model, optimizer, **KWARGS, resample="step")
    plain_loop(model, optimizer, first, 3)
    state = first.state_dict()
    first.close()
    assert set(state) == {"seed", "run_order", "steps"}
    resumed = LayerDropBack(model, optimizer, **{**KWARGS, "seed": None}, resample="step")
    resumed.load_state_dict(state)
    later = plain_loop(model, optimizer, resumed, 5, start=3)
    assert later == {step: draw for step, draw in reference.items() if step >= state["steps"]}


def test_tied_weights_and_user_frozen_layers_are_never_dropped(recwarn):
    torch.manual_seed(0)
    body = [nn.Linear(4, 4) for _ in range(6)]
    model = nn.Sequential(*body)
    body[5].weight = body[3].weight  # tied with the last layer, which keep_last keeps
    body[2].requires_grad_(False)
    ldb = LayerDropBack(model, (), drop_rate=0.99, keep_first=1, keep_last=1, seed=0)
    with ldb.epoch(2):
        assert "2" not in ldb.candidate_layers
        assert "3" in ldb.dropped_layers
        assert body[3].weight.requires_grad and not body[3].bias.requires_grad
    assert not body[2].weight.requires_grad  # still the user's
    assert warned(recwarn) == [NO_OPTIMIZER, BEFORE_A_STEP]  # as intended here: no optimizer, no step before


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"drop_rate": 1.0}, ValueError, r"`drop_rate` must be in \[0.0, 1.0\), got 1.0"),
        ({"every": 0}, ValueError, r"`every` must be an int >= 1, got 0"),
        ({"resample": "batch"}, ValueError, r"`resample` must be one of \['epoch', 'step'\]"),
        ({"branches": {"a": []}}, ValueError, r"`branches` is used by backward='block' only"),
        ({"keep_first": 20}, ValueError, r"found no candidate layer"),
    ],
)
def test_bad_arguments_fail_like_the_callbacks(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerDropBack(new_model(), (), **kwargs)


def test_a_non_optimizer_is_refused_naming_the_argument():
    with pytest.raises(TypeError, match=r"`optimizers` must be a torch.optim.Optimizer"):
        LayerDropBack(new_model(), ["sgd"])


def test_fabric_strategies_ldb_cannot_serve_are_refused_before_anything_changes():
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    fabric = Fabric(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(parallelize_fn=lambda m, _: m))
    with pytest.raises(ValueError, match="does not support Fabric's ModelParallelStrategy.*strategy='ddp'"):
        LayerDropBack(model, torch.optim.SGD(model.parameters(), lr=0.1), fabric=fabric)
    assert all(p.requires_grad for p in model.parameters())
    # One device and DDP are served.
    for strategy in ("auto", "ddp"):
        LayerDropBack(model, fabric=Fabric(accelerator="cpu", devices=1, strategy=strategy), seed=0).close()


def _ldb_warnings(record: Any, text: str) -> list[str]:
    return [str(w.message) for w in record if text in str(w.message)]


def test_a_loop_whose_optimizer_ldb_never_sees_is_warned_once():
    # Forgetting the optimizer trains on silently: no LR scaling, no per-step draws, layers in registration order.
    model = new_model()
    optimizer = sgd(model)
    with pytest.warns(UserWarning) as record:
        plain_loop(model, optimizer, LayerDropBack(model, (), **KWARGS), 3)
    warned = _ldb_warnings(record, "no optimizer is hooked")
    assert len(warned) == 1 and "lr_scale=2.0 is not applied" in warned[0]

    model = new_model()
    optimizer = sgd(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain_loop(model, optimizer, LayerDropBack(model, optimizer, **KWARGS), 3)
    assert not _ldb_warnings(record, "no optimizer is hooked")


class HeadFirst(nn.Module):
    """The head is registered before the body, so only the observed run order says it is the last layer."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 1)
        self.body = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_drop_epoch_drawn_before_any_training_step_is_warned_once():
    # A loop counting epochs from 1 with every=1 starts on a DROP epoch: that draw cannot know the data-flow order.
    torch.manual_seed(0)
    model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ldb = LayerDropBack(model, optimizer, drop_rate=0.5, every=1, keep_first=1, keep_last=1, seed=0)
    with pytest.warns(UserWarning) as record:
        plain_loop(model, optimizer, ldb, 4, start=1)
    warned = _ldb_warnings(record, "draws before LDB has seen a training step")
    assert len(warned) == 1 and "DROP epoch 1" in warned[0] and "keep_first=1/keep_last=1" in warned[0]
    assert ldb.candidate_layers[0] == "body.1"  # the order is known from the first step on

    torch.manual_seed(0)
    model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain_loop(model, optimizer, LayerDropBack(model, optimizer, drop_rate=0.5, every=1, keep_first=1, seed=0), 3)
    assert not _ldb_warnings(record, "draws before LDB has seen a training step")


def test_an_optimizer_made_after_the_engine_is_warned_once_and_another_models_is_not():
    # Recreated each epoch, the optimizer LDB was given is never the one that steps: the LR would stay unscaled.
    model = new_model()
    given = sgd(model)  # kept by the loop (LDB holds optimizers weakly), never stepped
    ldb = LayerDropBack(model, given, **KWARGS)
    other = nn.Linear(2, 2)  # e.g. a GAN's discriminator: its optimizer is none of LDB's business
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch in range(3):
            with ldb.epoch(epoch):
                other(torch.randn(2, 2)).sum().backward()
                other_optimizer.step()
        assert not _ldb_warnings(record, "that LDB was not given")
        for epoch in range(3):
            optimizer = sgd(model)
            with ldb.epoch(epoch):
                model(torch.randn(4, 8)).sum().backward()
                optimizer.step()
    warned = _ldb_warnings(record, "a SGD that LDB was not given steps the model")
    assert len(warned) == 1 and "ldb.hook_optimizers([optimizer])" in warned[0]


def test_fabrics_optimizer_wrapper_is_recognised_as_the_optimizer_ldb_was_given():
    # Fabric's wrapper imitates its optimizer's class; the optimizer that steps is the one inside, and LDB must know
    # it as its own: scaled on DROP epochs, and no "not given" warning.
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = new_model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    ldb = LayerDropBack(model, optimizer, **KWARGS, fabric=fabric)
    seen: dict[int, set[float]] = {}
    epoch = 0
    optimizer.optimizer.register_step_pre_hook(lambda opt, *_: seen.setdefault(epoch, set()).add(opt.param_groups[0]["lr"]))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch in range(3):
            with ldb.epoch(epoch):
                for _ in range(2):
                    fabric.backward(model(torch.randn(4, 8)).sum())
                    optimizer.step()
                    optimizer.zero_grad()
    assert not _ldb_warnings(record, "LayerDropBack")
    assert seen == {0: {0.1}, 1: {0.1}, 2: {0.2}}  # lr_scale=2.0 on DROP epoch 2


def test_full_batch_training_learns_the_run_order_from_its_one_step_per_epoch():
    # One optimizer step per epoch has no forward after it inside the epoch; the order must still be kept, or
    # keep_first/keep_last count registration order and HeadFirst's true first layer becomes a candidate.
    torch.manual_seed(0)
    model = HeadFirst()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ldb = LayerDropBack(model, optimizer, drop_rate=0.5, every=2, keep_first=1, keep_last=1, seed=0)
    x = torch.randn(16, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for epoch in range(3):
            with ldb.epoch(epoch):
                model(x).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
                if ldb.mode == "drop":
                    candidates = ldb.candidate_layers
    assert ldb.run_order is not None and not _ldb_warnings(record, "draws before LDB has seen a training step")
    assert candidates == tuple(f"body.{i}" for i in range(1, 6))  # body.0 kept first, head kept last


class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


@pytest.mark.parametrize("call_parts", [False, True])
def test_step_draws_come_when_the_loop_calls_the_models_parts_and_never_the_model(call_parts):
    # `model.head(model.enc(x))` never runs the model's own forward: the per-step draws must come all the same
    # (they were silently one draw per epoch), and equal those of a loop that calls `model(x)`.
    torch.manual_seed(0)
    model = EncoderHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ldb = LayerDropBack(model, optimizer, drop_rate=0.5, every=2, keep_first=1, seed=0, resample="step")
    x = torch.randn(32, 8)
    draws = []
    for epoch in range(3):
        with ldb.epoch(epoch):
            for batch in x.split(8):
                out = model.head(model.enc(batch)) if call_parts else model(batch)
                draws.append(ldb.dropped_layers)
                out.sum().backward()
                optimizer.step()
                optimizer.zero_grad()
    assert len(set(draws[8:])) > 1  # DROP epoch 2: a draw per step (two of its four happen to coincide)
    if call_parts:
        torch.manual_seed(0)
        model = EncoderHead()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        reference = LayerDropBack(model, optimizer, drop_rate=0.5, every=2, keep_first=1, seed=0, resample="step")
        expected = []
        for epoch in range(3):
            with reference.epoch(epoch):
                for batch in x.split(8):
                    out = model(batch)
                    expected.append(reference.dropped_layers)
                    out.sum().backward()
                    optimizer.step()
                    optimizer.zero_grad()
        assert draws == expected



def test_a_loop_that_calls_the_models_parts_learns_the_run_order_from_its_first_step_only():
    # The order is taken at the first forward after the first step. A loop that never calls the model itself and
    # evaluates an auxiliary head mid-epoch must not have that head recorded after the real one: keep_last=1 would
    # keep `aux`, and `head` would become droppable.
    torch.manual_seed(0)
    model = EncoderHead()
    model.aux = nn.Linear(8, 1)  # evaluated only, never trained
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("aux.")], lr=0.1)
    ldb = LayerDropBack(model, optimizer, drop_rate=0.5, every=2, keep_first=1, keep_last=1, seed=0)
    x = torch.randn(32, 8)
    for epoch in range(3):
        with ldb.epoch(epoch):
            for step, batch in enumerate(x.split(8)):
                model.head(model.enc(batch)).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
                if epoch == 0 and step == 0:
                    # A metric with autograd on (a pass under no_grad would place nothing, hooks or not).
                    model.aux(model.enc(batch)).detach()
            if ldb.mode == "drop":
                candidates = ldb.candidate_layers
    assert "head" not in candidates and candidates


# ------------------------------------------------------------------ torch.compile
needs_dynamo = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")


def compile_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "torch.compile" in str(w.message)]


@needs_dynamo
def test_a_compiled_model_keeps_its_own_layer_names_trains_exactly_like_eager_and_is_warned_once():
    eager = new_model()
    eager_optimizer = sgd(eager)
    eager_draws = plain_loop(eager, eager_optimizer, LayerDropBack(eager, eager_optimizer, **KWARGS), 3)

    model = new_model()
    optimizer = sgd(model)
    compiled = torch.compile(model, backend="eager")  # dynamo's guards and recompiles, without a C++ compiler
    # `include` names the user's layers: through the compiled wrapper they must not become "_orig_mod.net.3".
    ldb = LayerDropBack(compiled, optimizer, **KWARGS, include=["net.*"])
    assert ldb.candidate_layers == LayerDropBack(eager, (), **KWARGS).candidate_layers
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        draws = plain_loop(compiled, optimizer, ldb, 3)
    [message] = compile_warnings(record)
    assert message.startswith("LayerDropBack: the model TinyMLP is compiled") and "recompile_limit" in message
    assert draws == eager_draws and any(dropped for _, dropped in draws.values())
    for name, param in model.named_parameters():  # the recompiled DROP graph left the dropped layers alone
        assert torch.equal(param, eager.get_parameter(name)), name


@needs_dynamo
@pytest.mark.parametrize("compiled, warns", [("net", True), ("net.15", False)])
def test_a_compiled_submodule_is_warned_only_if_it_holds_candidates(compiled, warns):
    model = new_model()
    if compiled == "net":
        model.net = torch.compile(model.net, backend="eager")
    else:
        model.net[15] = torch.compile(model.net[15], backend="eager")  # the head, kept by keep_last
    optimizer = sgd(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        plain_loop(model, optimizer, LayerDropBack(model, optimizer, **KWARGS), 1)
    assert [m.split(" is compiled")[0] for m in compile_warnings(record)] == (
        ["LayerDropBack: submodule 'net'"] if warns else []
    )


def test_a_plain_loop_is_warned_like_the_trainer_when_a_draw_can_drop_every_layer_and_told_why_backward_fails():
    # The torch-level warnings live in the engine, so a plain loop gets the callback's warning and error note too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ldb = LayerDropBack(model, optimizer, drop_rate=0.999, every=1, keep_first=0, keep_last=0, seed=0)
    with pytest.warns(UserWarning, match=r"LayerDropBack: every trainable layer of Sequential.*drops all 2"):
        with pytest.warns(UserWarning, match="before LDB has seen a training step"):  # a DROP epoch comes first
            with pytest.raises(RuntimeError, match="does not require grad") as failed:
                with ldb.epoch(1):
                    model(torch.ones(2, 4)).sum().backward()
    assert "LayerDropBack had dropped (frozen) 0, 1 for this step" in "\n".join(getattr(failed.value, "__notes__", []))
    assert all(p.requires_grad for p in model.parameters())

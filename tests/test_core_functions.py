"""The pure functional core: schedule, layer discovery, candidate selection, draws."""

import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ldb.layers import discover_layers, select_candidates
from lightning_ldb.schedule import draw_dropped
from lightning_ldb.schedule import is_drop_epoch
from lightning_ldb.layers import RunOrderRecorder, order_layers, unique_numel
from lightning_ldb.schedule import draw_key


def test_schedule_matches_the_paper():
    assert [e for e in range(10) if is_drop_epoch(e, every=2)] == [2, 4, 6, 8]
    assert [e for e in range(10) if is_drop_epoch(e, every=3)] == [3, 6, 9]
    assert [e for e in range(4) if is_drop_epoch(e, every=1)] == [1, 2, 3]  # epoch 0 is always full


@pytest.mark.parametrize("epoch, every, error", [(-1, 2, ValueError), (1, 0, ValueError), (1.0, 2, TypeError), (1, True, TypeError)])
def test_schedule_rejects_bad_input(epoch, every, error):
    with pytest.raises(error, match="epoch|every"):
        is_drop_epoch(epoch, every)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight  # tied: it belongs to both layers
        self.scale = nn.Parameter(torch.ones(1))  # owned by the root module


def test_module_layers_in_order_with_a_shared_parameter_in_each_of_its_layers():
    model = Shared()
    layers = {layer.name: layer for layer in discover_layers(model)}
    assert list(layers) == ["", "embed", "block.0", "block.2", "head"]
    assert layers["head"].parameters == (model.embed.weight,)  # tied weights belong to both modules' layers
    assert unique_numel([p for layer in layers.values() for p in layer.parameters]) == sum(
        p.numel() for p in model.parameters()
    )


def test_layers_in_run_order_when_the_head_is_registered_before_the_body():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 1)
            self.body = nn.Linear(3, 4)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.body(x))

    model = HeadFirst()
    recorder = RunOrderRecorder(model)
    model(torch.zeros(1, 3))
    order = recorder.stop()
    assert order == ["", "body", "head"]
    assert all(not m._forward_pre_hooks for m in model.modules())  # the recorder left no hook behind
    ordered = [layer.name for layer in order_layers(discover_layers(model), order)]
    assert ordered == ["body", "head", "unused"]  # never seen running: registration order, last
    assert [layer.name for layer in order_layers(discover_layers(model, "parameter"), order, "parameter")][:2] == [
        "body.weight",
        "body.bias",
    ]


def test_uninitialised_lazy_parameters_belong_to_no_layer():
    model = nn.Sequential(nn.Linear(2, 3), nn.LazyLinear(4))
    assert [layer.name for layer in discover_layers(model)] == ["0"]
    model(torch.zeros(1, 2))
    assert [layer.name for layer in discover_layers(model)] == ["0", "1"]


def test_parameter_layers_match_named_parameters():
    model = Shared()
    names = [layer.name for layer in discover_layers(model, "parameter")]
    assert names == [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names  # the tied copy


def test_layers_do_not_depend_on_what_is_frozen():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = [layer.name for layer in discover_layers(model)]
    model[0].requires_grad_(False)
    assert [layer.name for layer in discover_layers(model)] == before


def test_candidates_keep_first_last_and_patterns():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])
    layers = discover_layers(model)
    names = lambda cands: [c.name for c in cands]  # noqa: E731
    assert names(select_candidates(layers, 4, 1)) == ["4", "5", "6"]
    assert names(select_candidates(layers, 0, 0, include=["[2-5]"])) == ["2", "3", "4", "5"]
    assert names(select_candidates(layers, 4, 1, exclude=["5"])) == ["4", "6"]
    assert select_candidates(layers, 5, 5) == []  # overlapping keeps leave nothing, never a negative slice


def test_draws_are_deterministic_and_keyed():
    a = draw_dropped(200, 0.3, seed=1, epoch=2)
    assert a == draw_dropped(200, 0.3, seed=1, epoch=2)
    assert a != draw_dropped(200, 0.3, seed=1, epoch=4)
    assert a != draw_dropped(200, 0.3, seed=2, epoch=2)
    assert draw_dropped(200, 0.3, seed=1, epoch=2, step=7) != draw_dropped(200, 0.3, seed=1, epoch=2, step=8)
    assert len({draw_key(s, e) for s in range(20) for e in range(20)}) == 400


def test_draw_rate_is_honoured_and_zero_is_a_no_op():
    flags = [f for epoch in range(50) for f in draw_dropped(100, 0.3, seed=0, epoch=epoch)]
    assert abs(sum(flags) / len(flags) - 0.3) < 0.02  # 5000 Bernoulli(0.3) draws: sd ~0.0065
    assert not any(draw_dropped(100, 0.0, seed=0, epoch=2))


def test_draws_never_touch_global_rngs():
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    for epoch in range(5):
        draw_dropped(50, 0.5, seed=3, epoch=epoch, step=epoch)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))

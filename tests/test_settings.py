"""The arguments exist once, as :class:`lightning_ldb.Settings`: the engine's and the callback's signatures, the
checkpoint's configuration and the benchmark's paper settings are checked against it."""

import inspect
from dataclasses import fields

import pytest
import torch
from torch import nn

from lightning_ldb import LayerDropBack, LayerDropBackCallback, Settings
from lightning_ldb.schedule import TRAINER_ONLY


def settings_signature(exclude=()):
    return [(f.name, f.default) for f in fields(Settings) if f.name not in exclude]


def signature_of(function, skip):
    parameters = inspect.signature(function).parameters.values()
    return [(p.name, p.default) for p in parameters if p.name not in skip and p.kind is p.POSITIONAL_OR_KEYWORD]


def test_the_callback_takes_every_setting_in_order_with_its_default():
    assert signature_of(LayerDropBackCallback.__init__, {"self"}) == settings_signature()


def test_the_engine_takes_every_setting_but_the_trainer_ones_in_order_with_its_default():
    assert signature_of(LayerDropBack.__init__, {"self", "model", "optimizers"}) == settings_signature(TRAINER_ONLY)


def test_the_callback_and_the_engine_check_their_arguments_as_the_settings_do():
    with pytest.raises(ValueError, match=r"`drop_rate` must be in \[0.0, 1.0\), got 1.5"):
        LayerDropBackCallback(drop_rate=1.5)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(ValueError, match=r"`drop_rate` must be in \[0.0, 1.0\), got 1.5"):
        LayerDropBack(model, torch.optim.SGD(model.parameters(), lr=0.1), drop_rate=1.5)
    with pytest.raises(ValueError, match="`communication` must be one of"):
        LayerDropBackCallback(communication="allreduce")


def test_a_callback_attribute_reads_and_writes_its_setting_checked():
    callback = LayerDropBackCallback(include="layer3.*")
    assert callback.include == ("layer3.*",) and callback.drop_rate == Settings().drop_rate
    callback.drop_rate = 0.5
    assert callback.settings.drop_rate == 0.5
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        callback.every = 0
    assert callback.every == Settings().every


def test_the_checkpoint_records_every_setting_but_the_seed():
    config = LayerDropBackCallback(seed=3).state_dict()["config"]
    assert list(config) == [f.name for f in fields(Settings) if f.name != "seed"]


def test_the_benchmarks_paper_settings_are_the_defaults():
    from lightning_ldb.bench.runner import LDB_ATTRIBUTES, PAPER_LDB

    defaults = Settings()
    assert PAPER_LDB and all(getattr(defaults, name) == value for name, value in PAPER_LDB.items())
    assert set(LDB_ATTRIBUTES) == {f.name for f in fields(Settings)} - {"seed"}

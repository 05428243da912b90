"""``LayerDropBack``: everything LDB does to one model and its optimizers, with or without a trainer.

The engine owns one model's LDB state: the droppable units and the candidates among them, the seed and the draws,
the freezing (and, in block mode, the detaching), the learning-rate scaling inside ``optimizer.step()``, the batch
size of an epoch, and its ``state_dict``. It imports torch, never Lightning, so that a plain PyTorch loop, a Fabric
script and the Trainer (through :class:`~lightning_ldb.LayerDropBackCallback`, a thin adapter over it) all run the
same code, and the same seed gives the same draws in each.

One DROP epoch, top to bottom: :meth:`LayerDropBack.start_epoch` sets the mode and the LR scale;
:meth:`LayerDropBack.draw` asks the units (:mod:`lightning_ldb.units`) for the candidates trainable now, draws over
them (:mod:`lightning_ldb.sampling`), has the units drop the drawn ones and tells the processes (:class:`Sync`);
every ``optimizer.step()`` runs with the scaled LR (:mod:`lightning_ldb.lr_scaling`); :meth:`LayerDropBack.end_epoch`
releases every unit. :meth:`LayerDropBack.epoch` does all of it for a plain loop, on every exit path.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_ldb import _compat
from lightning_ldb._checks import check_choice, check_float, check_int, check_patterns
from lightning_ldb.branches import BranchesSpec
from lightning_ldb.compiling import compiled_holders, describe_compiled, recompile_warning
from lightning_ldb.distributed import Sync, sync_for, warn_on_rank_zero
from lightning_ldb.freezing import ParameterFreezer, refuse_optimizers_that_move_dropped_parameters
from lightning_ldb.layers import GRANULARITIES, RunOrderRecorder, unique_numel
from lightning_ldb.lr_scaling import StepLRScaler
from lightning_ldb.sampling import DrawKey, draw_dropped, fresh_seed, global_seed
from lightning_ldb.schedule import DROP, FULL, BatchSchedule, epoch_mode
from lightning_ldb.units import Unit, units_for

RESAMPLE_MODES = ("epoch", "step")
#: What a dropped unit skips in the backward pass.
BACKWARD_MODES = ("weights", "block")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """LDB's arguments; :meth:`checked` checks them: each error names the argument, the value and the fix.

    Raises:
        TypeError: From :meth:`checked`, if an argument has the wrong type.
        ValueError: From :meth:`checked`, if an argument is out of range, or ``branches`` is given without
            ``backward="block"``.
    """

    drop_rate: float = 0.3
    every: int = 2
    lr_scale: float = 2.0
    batch_scale: int = 2
    keep_first: int = 4
    keep_last: int = 1
    resample: str = "epoch"
    seed: Optional[int] = None
    granularity: str = "module"
    include: Optional[Sequence[str]] = None
    exclude: Optional[Sequence[str]] = None
    backward: str = "weights"
    branches: BranchesSpec = None

    @classmethod
    def checked(
        cls,
        drop_rate: Any = 0.3,
        every: Any = 2,
        lr_scale: Any = 2.0,
        batch_scale: Any = 2,
        keep_first: Any = 4,
        keep_last: Any = 1,
        resample: Any = "epoch",
        seed: Any = None,
        granularity: Any = "module",
        include: Any = None,
        exclude: Any = None,
        backward: Any = "weights",
        branches: Any = None,
    ) -> Settings:
        """The settings, each argument checked (a plain function, so a failed check's traceback is LDB's own)."""
        if seed is not None:
            check_int("seed", seed, minimum=0)
        if branches is not None and not (isinstance(branches, Mapping) or callable(branches)):
            raise TypeError(
                "`branches` must be None (the built-in rules), a mapping {entry pattern: [member names]} (e.g."
                f" {{'blocks.*.norm1': ['attn']}}) or a callable model -> branches, got {branches!r}."
            )
        settings = cls(
            drop_rate=check_float("drop_rate", drop_rate, 0.0, 1.0),
            every=check_int("every", every, minimum=1),
            lr_scale=check_float("lr_scale", lr_scale, 0.0, low_inclusive=False),
            batch_scale=check_int("batch_scale", batch_scale, minimum=1),
            keep_first=check_int("keep_first", keep_first, minimum=0),
            keep_last=check_int("keep_last", keep_last, minimum=0),
            resample=check_choice("resample", resample, RESAMPLE_MODES),
            seed=seed,
            granularity=check_choice("granularity", granularity, GRANULARITIES),
            include=check_patterns("include", include),
            exclude=check_patterns("exclude", exclude),
            backward=check_choice("backward", backward, BACKWARD_MODES),
            branches=branches,
        )
        if branches is not None and settings.backward != "block":
            raise ValueError(
                f"`branches` is used by backward='block' only, got backward={backward!r}. Pass backward='block'."
            )
        return settings


class LayerDropBack:
    r"""LayerDropBack (LDB) on one model and its optimizers: full epochs alternate with DROP epochs.

    On a DROP epoch (epoch ``e > 0`` with ``e % every == 0``) each candidate unit is dropped with probability
    ``drop_rate``: its trainable parameters get ``requires_grad=False`` before the forward, so autograd skips their
    weight gradient and no optimizer moves them; the forward pass is unchanged. Every optimizer steps with
    ``lr * lr_scale`` during DROP epochs, applied inside ``optimizer.step()`` only, so schedulers and checkpoints see
    the unscaled schedule. :meth:`batch_size` gives the DROP-epoch batch size for the loader.

    In a plain loop, enter each epoch with :meth:`epoch`; under the Trainer,
    :class:`~lightning_ldb.LayerDropBackCallback` drives it.

    Args:
        model: The model as the loop calls it: a ``torch.nn.Module``, a ``DistributedDataParallel``, or what
            ``fabric.setup`` returned.
        optimizers: One optimizer or a list (Fabric's wrappers too); their ``step()`` is scaled on DROP epochs.
        drop_rate, every, lr_scale, batch_scale, keep_first, keep_last, resample, seed, granularity, include,
            exclude, backward, branches: As for :class:`~lightning_ldb.LayerDropBackCallback`. ``seed=None`` takes
            the seed last given to ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else one from the OS; in
            several processes rank 0's is used everywhere.
        fabric: The ``lightning.fabric.Fabric`` that set up ``model``; under its DDP strategy LDB rebuilds the
            wrapper once with ``find_unused_parameters=True``. Without it, a ``DistributedDataParallel`` must be
            built with ``find_unused_parameters=True`` (the first DROP epoch raises otherwise).
        sync: How to reach the other processes (for integrations; the callback passes its strategy's). ``None``:
            chosen from ``fabric`` and ``torch.distributed``.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, or no unit of ``model`` can ever be dropped.

    Example::

        >>> import torch
        >>> model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ldb = LayerDropBack(model, optimizer, drop_rate=0.5, every=2, keep_first=1, keep_last=1, seed=3)
        >>> ldb.batch_size(32, epoch=2)
        64
        >>> with ldb.epoch(2):
        ...     ldb.mode, ldb.dropped_layers
        ('drop', ('3', '4'))
        >>> all(p.requires_grad for p in model.parameters())  # restored on exit
        True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Union[Optimizer, Iterable[Any], None] = (),
        drop_rate: float = 0.3,
        every: int = 2,
        lr_scale: float = 2.0,
        batch_scale: int = 2,
        keep_first: int = 4,
        keep_last: int = 1,
        resample: str = "epoch",
        seed: Optional[int] = None,
        granularity: str = "module",
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        backward: str = "weights",
        branches: BranchesSpec = None,
        *,
        fabric: Any = None,
        sync: Optional[Sync] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        s = self.settings = Settings.checked(
            drop_rate, every, lr_scale, batch_scale, keep_first, keep_last, resample, seed, granularity, include,
            exclude, backward, branches,
        )  # fmt: skip
        self.model = model
        self.module, self._model_compiled = _unwrap_model(model)
        self.freezer = ParameterFreezer()
        self.units = units_for(s.backward, self.freezer, s.granularity, s.keep_first, s.keep_last, s.include, s.exclude, s.branches)
        self.lr = StepLRScaler(before_step=self._before_step, after_step=self._after_step)
        self.sync: Sync = sync if sync is not None else sync_for(model, s.resample, fabric)
        #: Module names in the order they took part in a training step, see ``RunOrderRecorder`` (``None``: not yet).
        self.run_order: Optional[list[str]] = None
        self.candidates: list[Unit] = []
        self.dropped: tuple[Unit, ...] = ()
        self.mode = FULL
        #: Optimizer steps taken inside :meth:`epoch` (the step of ``resample="step"`` draws in a plain loop).
        self.steps = 0
        self._epoch: Optional[int] = None
        self._draw_key: Optional[DrawKey] = None
        self._dropped_parameters: list[nn.Parameter] = []
        self._fractions: list[float] = []
        self._recorder: Optional[RunOrderRecorder] = None
        self._driving = False  # inside ``epoch()``: the engine redraws and records by itself
        self._warned_nothing_to_drop = False
        self._warned_no_run_order = False
        self._warned_no_optimizer = False
        self._warned_compiled = False
        #: Optimizers found to hold none of the model's parameters (weakly held: no id reuse, nothing kept alive).
        self._foreign_optimizers: weakref.WeakSet[Optimizer] = weakref.WeakSet()
        # The plain loop under a GradScaler: one dropped parameter per optimizer that the draw left without any
        # trainable parameter, given a zero placeholder gradient during each backward (see ``_watch_starved``).
        self._placeholders: list[nn.Parameter] = []
        self._placeholder_hooks: list[RemovableHandle] = []
        #: Whether DROP epochs load ``batch_scale`` times larger batches (said in warnings): set by the callback
        #: when its data source is a mixin, and by :meth:`batch_size` when a loop asks for a DROP epoch's size.
        self.batch_scaled = False
        self._stepped = False
        self.seed = self._resolve_seed()
        if any(True for _ in self.module.parameters()):
            # Under the Trainer, modules made in ``configure_model`` do not exist yet; ``discover`` runs again.
            self.discover()
        self.hook_optimizers(_optimizer_list(optimizers))

    # ------------------------------------------------------------------ introspection
    @property
    def dropped_layers(self) -> tuple[str, ...]:
        """Names of the units dropped right now (layers, parameters with ``granularity="parameter"``, or branches)."""
        return tuple(unit.name for unit in self.dropped)

    @property
    def candidate_layers(self) -> tuple[str, ...]:
        """Names of the units that may be dropped, in run order (as of the last draw or discovery)."""
        return tuple(unit.name for unit in self.candidates)

    @property
    def dropped_fraction(self) -> float:
        """The mean fraction of droppable parameter elements the draws of this epoch dropped (0 without a draw)."""
        return sum(self._fractions) / len(self._fractions) if self._fractions else 0.0

    def batch_size(self, base: int, epoch: int) -> int:
        """The training batch size of ``epoch``: ``base * batch_scale`` on DROP epochs, else ``base``."""
        check_int("base", base, minimum=1)
        check_int("epoch", epoch, minimum=0)
        size = BatchSchedule(self.settings.every, self.settings.batch_scale).batch_size(epoch, base)
        self.batch_scaled = self.batch_scaled or size != base
        return size

    # ------------------------------------------------------------------ the plain loop
    @contextmanager
    def epoch(self, epoch: int) -> Iterator[LayerDropBack]:
        """Train epoch ``epoch`` inside this block: on a DROP epoch, draw and drop, and scale the LR inside ``step()``.

        With ``resample="step"`` each optimizer step gets a new draw, applied before the next forward. Whatever
        happens inside the block (an exception included), every flag, hook and learning rate is restored on exit.

        Raises:
            ValueError: If ``epoch`` is not an int ``>= 0``.
        """
        check_int("epoch", epoch, minimum=0)
        self._warn_if_no_optimizer()
        self._warn_if_compiled()
        self.start_epoch(epoch)
        handles = [self.model.register_forward_pre_hook(self._before_model_forward)]
        if self.run_order is None or (self.mode == DROP and self.settings.resample == "step"):
            # A loop may run parts of the model (``model.encoder(x)``, the members of a ModuleDict) and never the
            # model itself: then the first module to run after a step starts the next forward. The model's own hook
            # runs first when it is called (before a DDP wrapper's forward), and the others find nothing left to do.
            # Only while a forward can have work to do: a hook on every module is a Python call per module per
            # forward (docs/method-card.md, "What the engine costs a plain loop").
            handles += [module.register_forward_pre_hook(self._before_forward) for module in self.module.modules()]
        unseen = register_optimizer_step_pre_hook(self._warn_if_step_unseen)
        self._driving = True
        try:
            if self.run_order is None:
                self.start_run_order()
            if self.mode == DROP:
                self.draw(epoch, self.steps if self.settings.resample == "step" else None)
            yield self
            if self._stepped:
                # The epoch's last step had no forward after it. With one step per epoch (full-batch training) that
                # is the only step: without this the order is never kept, and keep_first/keep_last count registration.
                self.finish_run_order()
        finally:
            self._driving = self._stepped = False
            for handle in handles:
                handle.remove()
            unseen.remove()
            self._stop_recorder()  # an order not confirmed by a step is not kept (and no collective on failure)
            self.end_epoch()

    # ------------------------------------------------------------------ what a driver calls
    def discover(self) -> None:
        """List the units again (modules made after construction, lazy modules materialised since)."""
        self.units.discover(self.module, self.run_order or ())
        self.candidates = self.units.candidates()

    def hook_optimizers(self, optimizers: Iterable[Any], replace: bool = False) -> None:
        """Scale these optimizers' ``step()`` on DROP epochs (``replace``: forget the ones hooked before)."""
        optimizers = [_unwrap_optimizer(o) for o in optimizers]
        refuse_optimizers_that_move_dropped_parameters(optimizers)
        if replace:
            self.lr.attach(optimizers)
        else:
            self.lr.attach_new(optimizers)

    def start_epoch(self, epoch: int) -> None:
        """Enter ``epoch``: its mode and LR scale. The draw is :meth:`draw`'s (the Trainer's first batch)."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._fractions = []
        self.mode = epoch_mode(epoch, self.settings.every)
        self._release()
        self.lr.scale = self.settings.lr_scale if self.mode == DROP else 1.0

    def draw(self, epoch: int, step: Optional[int] = None) -> None:
        """Drop the units drawn for ``(epoch, step)`` among those trainable now.

        Called again with the same key, it only re-freezes what someone else made trainable since.
        """
        key = (epoch, step)
        if key == self._draw_key:
            if self.freezer.freeze(self._dropped_parameters):
                self.sync.on_trainable_set_changed(key, self.dropped_layers)
            return
        self.units.release()  # what is trainable now is what the user (and other callbacks) left trainable
        self.sync.before_draw()
        if self.run_order is None and not self._warned_no_run_order:
            self._warned_no_run_order = True
            self._warn_no_run_order(epoch)
        candidates = self.units.candidates()
        if not candidates and not self._warned_nothing_to_drop:
            self._warned_nothing_to_drop = True
            self._warn_nothing_to_drop(epoch)
        flags = draw_dropped(len(candidates), self.settings.drop_rate, self.seed, epoch, step)
        dropped = tuple(unit for unit, drop in zip(candidates, flags) if drop)
        frozen, droppable = self.units.drop(dropped, candidates)
        self.candidates, self.dropped, self._dropped_parameters, self._draw_key = candidates, dropped, frozen, key
        total = unique_numel(droppable)
        self._fractions.append(unique_numel(frozen) / total if total else 0.0)
        self._watch_starved()
        self.sync.on_trainable_set_changed(key, self.dropped_layers)

    def end_epoch(self) -> None:
        """Release every unit; ``step()`` runs at the unscaled LR again (also after a step that raised)."""
        self._release()
        self.lr.scale = 1.0
        self.lr.recover()

    def start_run_order(self) -> None:
        """Record the order in which modules run, from now until :meth:`finish_run_order`."""
        if self._recorder is None:
            self._recorder = RunOrderRecorder(self.module)

    def finish_run_order(self) -> None:
        """Take rank 0's recorded run order (a collective in several processes) and list the units again."""
        if self._recorder is None:
            return
        observed = self._stop_recorder()
        self.run_order = list(self.sync.broadcast(observed))
        self.discover()  # lazy modules are materialised after their first forward

    def give_placeholder_grads(self, optimizers: Iterable[Optimizer]) -> None:
        """A zero gradient on one dropped parameter of each optimizer without any, for ``GradScaler``.

        A GradScaler refuses to step an optimizer that holds no gradient at all, which is what an optimizer whose
        parameters are all dropped holds. The step pre-hook takes the placeholder away before the optimizer runs.
        """
        if self.freezer.frozen:
            self.freezer.give_placeholder_grads(optimizers)

    def close(self) -> None:
        """Undo everything: flags, detach hooks, optimizer hooks, scaled LRs. Local only (no collective)."""
        self._stop_recorder()
        self._unwatch_starved()
        self.units.release()
        self.dropped, self._dropped_parameters, self._draw_key = (), [], None
        self.lr.detach()
        self.sync.close()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The seed, the observed run order and the step count: every draw is a function of these."""
        return {"seed": self.seed, "run_order": list(self.run_order) if self.run_order else None, "steps": self.steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue a run: its seed (unless an explicit ``seed=`` differs, which wins, with a warning), run order
        and step count."""
        seed = state_dict.get("seed")
        explicit = self.settings.seed
        if seed is not None and explicit is not None and explicit != seed:
            warn_on_rank_zero(
                f"LayerDropBack resumes with seed={explicit}, but the checkpoint was made with seed {seed}: the draws"
                f" from here on differ from the interrupted run's. Pass seed={seed} (or seed=None) to continue with"
                " the same draws."
            )
        elif seed is not None:
            self.seed = int(seed)
        run_order = state_dict.get("run_order")
        self.run_order = list(run_order) if run_order is not None else None
        if self.units.layers or self.run_order:
            self.discover()
        self.steps = int(state_dict.get("steps", self.steps))

    # ------------------------------------------------------------------ internals
    def _resolve_seed(self) -> int:
        seed = self.settings.seed
        if seed is None:
            seed = global_seed()
            if seed is None:
                seed = fresh_seed()
                _log.info("LayerDropBack: no `seed` and no `seed_everything`; drawing with seed %d.", seed)
        return int(self.sync.broadcast(seed))  # one seed for all ranks, whatever each process was seeded with

    def _warn_nothing_to_drop(self, epoch: int) -> None:
        # With a frozen backbone (a linear probe, the epochs before ``BackboneFinetuning`` unfreezes) every DROP
        # epoch is like this, yet the LR (and batch) scaling still apply: a user must not find that out from a curve.
        s = self.settings
        applies = f"the learning rate x lr_scale={s.lr_scale}"
        if self.batch_scaled:
            applies += f" and the batch x batch_scale={s.batch_scale}"
        warn_on_rank_zero(
            f"LayerDropBack: DROP epoch {epoch} has no layer to drop: {self.units.why_no_candidates()}. It still"
            f" trains with {applies}. keep_first/keep_last count the trainable layers, in the order the data flows"
            " through them. If this is not what you want, lower keep_first/keep_last or widen include/exclude;"
            " warned once."
        )

    def _warn_no_run_order(self, epoch: int) -> None:
        # The order comes from a training step (epoch 0, never a DROP epoch, shows it). A loop that starts on a DROP
        # epoch (epochs counted from 1 with every=1) or a resume without LDB's state draws before it has seen one.
        s = self.settings
        warn_on_rank_zero(
            f"LayerDropBack: DROP epoch {epoch} draws before LDB has seen a training step, so for this draw"
            f" keep_first={s.keep_first}/keep_last={s.keep_last} count the layers in the order they were registered,"
            " not the order the data flows through them (a head registered before the body can be dropped). Start"
            " with a full epoch (epochs count from 0; epoch 0 is never a DROP epoch), or load the state_dict of the"
            " run you continue; warned once."
        )

    def _warn_if_no_optimizer(self) -> None:
        # Without a hooked optimizer no step is seen: the LR is not scaled, resample="step" never draws again and the
        # run order (what keep_first/keep_last count) is never confirmed. The plain loop would train on, unscaled.
        if self.lr.is_attached() or self._warned_no_optimizer:
            return
        self._warned_no_optimizer = True
        warn_on_rank_zero(
            "LayerDropBack.epoch(): no optimizer is hooked, so LDB never sees optimizer.step(): DROP epochs keep the"
            f" unscaled learning rate (lr_scale={self.settings.lr_scale} is not applied), resample='step' never"
            " draws again, and keep_first/keep_last count the layers in the order they were registered, not the"
            " order the data flows through them. Pass the optimizer(s): LayerDropBack(model, optimizer, ...), or"
            " call ldb.hook_optimizers([optimizer]); warned once."
        )

    def _warn_if_compiled(self) -> None:
        # The plain loop's warning (the callback says it at fit start): once, when compiled code holds candidates.
        if self._warned_compiled or not self.candidates:
            return
        self._warned_compiled = True
        if self._model_compiled:
            what = f"the model {type(self.module).__name__}"
        else:
            holders = compiled_holders(self.module, self.candidates)
            if not holders:
                return
            what = describe_compiled(holders)
        warn_on_rank_zero(recompile_warning("LayerDropBack", what))

    def _warn_if_step_unseen(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # An optimizer made after the engine (recreated each epoch, say) steps the model unscaled and unseen. Only one
        # that holds the model's parameters: another model's optimizer (a GAN's discriminator) is none of LDB's business.
        if self._warned_no_optimizer or self.lr.is_attached(optimizer) or optimizer in self._foreign_optimizers:
            return
        self._foreign_optimizers.add(optimizer)  # checked once, not at every step (a GAN's other optimizer)
        own = {id(p) for p in self.module.parameters()}
        if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            return
        self._warned_no_optimizer = True
        warn_on_rank_zero(
            f"LayerDropBack.epoch(): a {type(optimizer).__name__} that LDB was not given steps the model (one made"
            " after LayerDropBack, e.g. recreated each epoch): its DROP-epoch steps keep the unscaled learning rate"
            f" (lr_scale={self.settings.lr_scale} is not applied), and LDB does not see them (resample='step' draws,"
            " the order keep_first/keep_last count). Call ldb.hook_optimizers([optimizer]) after making it; warned"
            " once."
        )

    def _watch_starved(self) -> None:
        """In the plain loop, give each optimizer this draw left with no trainable parameter a placeholder gradient.

        ``torch.amp.GradScaler.step(optimizer)`` raises "No inf checks were recorded for this optimizer" when the
        optimizer holds no gradient at all. The callback gives placeholders after the backward; a plain loop has no
        such hook, so a post-accumulate-grad hook on the trainable parameters gives them during every backward,
        whatever the loop's ``zero_grad`` placement. The placeholder is a zero tensor on one dropped parameter,
        taken away by the step pre hook before the update (``_before_step``): the optimizer's parameters never move.
        Only for such draws (a hook per parameter per backward costs a Python call each).
        """
        self._unwatch_starved()
        if not self._driving or not self.freezer.frozen:
            return  # under the Trainer the callback gives the placeholders (``on_after_backward``)
        frozen = {id(p) for p in self.freezer.frozen}
        for optimizer in self.lr.attached():
            params = [p for group in optimizer.param_groups for p in group["params"]]
            mine = [p for p in params if id(p) in frozen]
            if mine and not any(p.requires_grad for p in params):
                self._placeholders.append(min(mine, key=lambda p: p.numel()))
        if self._placeholders:
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            self._placeholder_hooks = [p.register_post_accumulate_grad_hook(self._give_placeholders) for p in trainable]

    def _give_placeholders(self, _: torch.Tensor) -> None:
        for param in self._placeholders:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    def _unwatch_starved(self) -> None:
        for handle in self._placeholder_hooks:
            handle.remove()
        self._placeholder_hooks, self._placeholders = [], []

    def _release(self) -> None:
        self._unwatch_starved()
        if self._draw_key is None and not self.freezer.frozen:
            return
        self.units.release()
        self.dropped, self._dropped_parameters, self._draw_key = (), [], None
        self.sync.on_trainable_set_changed(None, ())

    def _stop_recorder(self) -> list[str]:
        recorder, self._recorder = self._recorder, None
        return recorder.stop() if recorder is not None else []

    def _before_step(self, optimizer: Optimizer) -> None:
        # A ``zero_grad(set_to_none=False)`` would leave dropped parameters a zero gradient, which momentum and
        # weight decay still act on. Only this optimizer's: another one's scaler placeholder must last until its step.
        self.freezer.clear_grads(optimizer)

    def _after_step(self, optimizer: Optimizer) -> None:
        if self._driving:
            self.steps += 1
            self._stepped = True

    def _before_model_forward(self, module: nn.Module, args: Any) -> None:
        # A step that raised (caught by a "skip this batch" handler) leaves the LR it scaled: put it back before the
        # next forward, not only at the next step. Here only, not in every module's hook: inside a closure's forward
        # a step is running, and finding that out walks the stack.
        self.lr.recover()
        self._before_forward(module, args)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # The first forward after an optimizer step: the step's run order is complete, and with resample="step" the
        # next step gets its own draw. Micro-batches of one accumulated step share a draw (no step in between).
        if not self._stepped:
            return
        self._stepped = False
        self.finish_run_order()
        if self.mode == DROP and self.settings.resample == "step" and self._epoch is not None:
            self.draw(self._epoch, self.steps)


def _unwrap_model(model: nn.Module) -> tuple[nn.Module, bool]:
    # The user's module, inside Fabric's wrapper, DistributedDataParallel (both hold it in public ``module``) and
    # torch.compile (whose wrapper would prefix every layer name with ``_orig_mod.``: `include` would match nothing);
    # and whether a torch.compile wrapper was among them.
    compiled = False
    while True:
        if _compat.is_fabric_module(model) or isinstance(model, DistributedDataParallel):
            inner = model.module
        else:
            inner = _compat.uncompiled(model)
            compiled = compiled or inner is not model
        if inner is model:
            return model, compiled
        model = inner


def _unwrap_optimizer(optimizer: Any) -> Optimizer:
    # Fabric's (and Lightning's) optimizer wrappers hold the torch optimizer in ``optimizer``; its step runs the hooks.
    # They pass ``isinstance(wrapper, Optimizer)`` (their class imitates the optimizer's), so unwrap by the attribute:
    # the optimizer whose ``step`` runs is the one a step hook receives and must be recognised as hooked.
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), Optimizer):
        inner = inner.optimizer
    if not isinstance(inner, Optimizer):
        raise TypeError(
            f"`optimizers` must be a torch.optim.Optimizer or a list of them, got {type(optimizer).__name__}."
        )
    return inner


def _optimizer_list(optimizers: Union[Optimizer, Iterable[Any], None]) -> list[Any]:
    if optimizers is None:
        return []
    if isinstance(optimizers, Optimizer) or hasattr(optimizers, "param_groups"):
        return [optimizers]
    return list(optimizers)

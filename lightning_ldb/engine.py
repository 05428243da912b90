"""``LayerDropBack``: everything LDB does to one model and its optimizers, with or without a trainer.

The engine owns one model's LDB state: the droppable units and the candidates among them, the seed and the draws,
the freezing (and, in block mode, the detaching), the learning-rate scaling inside ``optimizer.step()``, the batch
size of an epoch, and its ``state_dict``. It imports torch, never Lightning, so that a plain PyTorch loop, a Fabric
script and the Trainer (through :class:`~lightning_ldb.LayerDropBackCallback`, which drives it) all run the
same code, and the same seed gives the same draws in each.

One DROP epoch, top to bottom: ``LayerDropBack._start_epoch`` sets the mode and the LR scale;
``LayerDropBack._draw`` asks the units (:mod:`lightning_ldb.dropping`) for the candidates trainable now, draws over
them (:mod:`lightning_ldb.schedule`), has the units drop the drawn ones and tells the processes (:class:`Sync`);
every ``optimizer.step()`` runs with the scaled LR (:mod:`lightning_ldb.lr_scaling`); ``LayerDropBack._end_epoch``
releases every unit. :meth:`LayerDropBack.epoch` does all of it for a plain loop, on every exit path.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from lightning_ldb import _compat
from lightning_ldb.branches import BranchesSpec
from lightning_ldb.distributed import Sync, sync_for, warn_on_rank_zero
from lightning_ldb.dropping import (
    ParameterFreezer,
    Unit,
    compiled_holders,
    describe_compiled,
    recompile_warning,
    refuse_optimizers_that_move_dropped_parameters,
    units_for,
)
from lightning_ldb.layers import RunOrderRecorder, unique_numel
from lightning_ldb.lr_scaling import StepLRScaler
from lightning_ldb.schedule import (
    DROP,
    FULL,
    BatchSchedule,
    DrawKey,
    Settings,
    check_int,
    draw_dropped,
    epoch_mode,
    fresh_seed,
    global_seed,
)

_log = logging.getLogger(__name__)


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
        >>> x = torch.randn(8, 4)
        >>> for epoch in range(3):
        ...     with ldb.epoch(epoch):
        ...         optimizer.zero_grad()
        ...         model(x).sum().backward()
        ...         optimizer.step()
        ...         print(epoch, ldb.mode, ldb.dropped_layers)
        0 full ()
        1 full ()
        2 drop ('3', '4')
        >>> all(p.requires_grad for p in model.parameters())  # restored on exit
        True
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Optimizer | Iterable[Any] | None = (),
        drop_rate: float = 0.3,
        every: int = 2,
        lr_scale: float = 2.0,
        batch_scale: int = 2,
        keep_first: int = 4,
        keep_last: int = 1,
        resample: str = "epoch",
        seed: int | None = None,
        granularity: str = "module",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        backward: str = "weights",
        branches: BranchesSpec = None,
        *,
        fabric: Any = None,
        sync: Sync | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        s = self.settings = Settings.from_locals(locals())
        self.model = model
        self.module, self._model_compiled = _unwrap_model(model)
        self._freezer = ParameterFreezer()
        self._units = units_for(
            s.backward, self._freezer, s.granularity, s.keep_first, s.keep_last, s.include, s.exclude, s.branches
        )
        self._lr = StepLRScaler(before_step=self._before_step, after_step=self._after_step)
        self._sync: Sync = sync if sync is not None else sync_for(model, s.resample, fabric)
        #: Module names in the order they took part in a training step, see ``RunOrderRecorder`` (``None``: not yet).
        self.run_order: list[str] | None = None
        self.candidates: list[Unit] = []
        self.dropped: tuple[Unit, ...] = ()
        self.mode = FULL
        #: Optimizer steps taken inside :meth:`epoch` (the step of ``resample="step"`` draws in a plain loop).
        self.steps = 0
        self._epoch: int | None = None
        self._draw_key: DrawKey | None = None
        self._dropped_parameters: list[nn.Parameter] = []
        self._fractions: list[float] = []
        self._recorder: RunOrderRecorder | None = None
        self._driving = False  # inside ``epoch()``: the engine redraws and records by itself
        self._warned_nothing_to_drop = False
        self._warned_no_run_order = False
        self._warned_no_optimizer = False
        self._warned_composition = False
        #: Optimizers found to hold none of the model's parameters (weakly held: no id reuse, nothing kept alive).
        self._foreign_optimizers: weakref.WeakSet[Optimizer] = weakref.WeakSet()
        # The plain loop under a GradScaler: one dropped parameter per optimizer that the draw left without any
        # trainable parameter, given a zero placeholder gradient during each backward (see ``_watch_starved``).
        self._placeholders: list[nn.Parameter] = []
        self._placeholder_hooks: list[RemovableHandle] = []
        #: Whether DROP epochs load ``batch_scale`` times larger batches (said in warnings): ``True`` or ``False``, set
        #: by the callback (a mixin serves the train loader, or not); ``None`` in a plain loop (its loader's business).
        self._batch_scaled: bool | None = None
        self._stepped = False
        self.seed = self._resolve_seed()
        if any(True for _ in self.module.parameters()):
            # Under the Trainer, modules made in ``configure_model`` do not exist yet; ``discover`` runs again.
            self._discover()
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
        return BatchSchedule(self.settings.every, self.settings.batch_scale).batch_size(epoch, base)

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
        self._warn_about_composition(self._lr.attached())
        self._start_epoch(epoch)
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
                self._start_run_order()
            if self.mode == DROP:
                self._draw(epoch, self.steps if self.settings.resample == "step" else None)
            try:
                yield self
            except BaseException as error:
                self._note_dropped_layers(error)
                raise
            if self._stepped:
                # The epoch's last step had no forward after it. With one step per epoch (full-batch training) that
                # is the only step: without this the order is never kept, and keep_first/keep_last count registration.
                self._finish_run_order()
        finally:
            self._driving = self._stepped = False
            for handle in handles:
                handle.remove()
            unseen.remove()
            self._stop_recorder()  # an order not confirmed by a step is not kept (and no collective on failure)
            self._end_epoch()

    # ------------------------------------------------------------------ what a driver calls
    def _discover(self) -> None:
        """List the units again (modules made after construction, lazy modules materialised since)."""
        self._units.discover(self.module, self.run_order or ())
        self.candidates = list(self._units.candidates())

    def hook_optimizers(self, optimizers: Iterable[Any], replace: bool = False) -> None:
        """Scale these optimizers' ``step()`` on DROP epochs (``replace``: forget the ones hooked before)."""
        optimizers = [_unwrap_optimizer(o) for o in optimizers]
        refuse_optimizers_that_move_dropped_parameters(optimizers)
        if replace:
            self._lr.attach(optimizers)
        else:
            self._lr.attach_new(optimizers)

    def _start_epoch(self, epoch: int) -> None:
        """Enter ``epoch``: its mode and LR scale. The draw is :meth:`_draw`'s (the Trainer's first batch)."""
        if epoch != self._epoch:
            self._epoch = epoch
            self._fractions = []
        self.mode = epoch_mode(epoch, self.settings.every)
        self._release()
        self._lr.scale = self.settings.lr_scale if self.mode == DROP else 1.0

    def _draw(self, epoch: int, step: int | None = None) -> None:
        """Drop the units drawn for ``(epoch, step)`` among those trainable now.

        Called again with the same key, it only re-freezes what someone else made trainable since.
        """
        key = (epoch, step)
        if key == self._draw_key:
            if self._freezer.freeze(self._dropped_parameters):
                self._sync.on_trainable_set_changed(key, self.dropped_layers)
            return
        self._units.release()  # what is trainable now is what the user (and other callbacks) left trainable
        self._sync.before_draw()
        if self.run_order is None and not self._warned_no_run_order:
            self._warned_no_run_order = True
            self._warn_no_run_order(epoch)
        candidates = list(self._units.candidates())
        if not candidates and not self._warned_nothing_to_drop:
            self._warned_nothing_to_drop = True
            self._warn_nothing_to_drop(epoch)
        flags = draw_dropped(len(candidates), self.settings.drop_rate, self.seed, epoch, step)
        dropped = tuple(unit for unit, drop in zip(candidates, flags, strict=False) if drop)
        frozen, droppable = self._units.drop(dropped, candidates)
        self.candidates, self.dropped, self._dropped_parameters, self._draw_key = candidates, dropped, frozen, key
        total = unique_numel(droppable)
        self._fractions.append(unique_numel(frozen) / total if total else 0.0)
        self._watch_starved()
        self._sync.on_trainable_set_changed(key, self.dropped_layers)

    def _end_epoch(self) -> None:
        """Release every unit; ``step()`` runs at the unscaled LR again (also after a step that raised)."""
        self._release()
        self._lr.scale = 1.0
        self._lr.recover()

    def _start_run_order(self) -> None:
        """Record the order in which modules run, from now until :meth:`_finish_run_order`."""
        if self._recorder is None:
            self._recorder = RunOrderRecorder(self.module)

    def _finish_run_order(self) -> None:
        """Take rank 0's recorded run order (a collective in several processes) and list the units again."""
        if self._recorder is None:
            return
        observed = self._stop_recorder()
        self.run_order = list(self._sync.broadcast(observed))
        self._discover()  # lazy modules are materialised after their first forward

    def _give_placeholder_grads(self, optimizers: Iterable[Optimizer]) -> None:
        """A zero gradient on one dropped parameter of each optimizer without any, for ``GradScaler``.

        A GradScaler refuses to step an optimizer that holds no gradient at all, which is what an optimizer whose
        parameters are all dropped holds. The step pre-hook takes the placeholder away before the optimizer runs.
        """
        if self._freezer.frozen:
            self._freezer.give_placeholder_grads(optimizers)

    def close(self) -> None:
        """Undo everything: flags, detach hooks, optimizer hooks, scaled LRs. Local only (no collective)."""
        self._stop_recorder()
        self._unwatch_starved()
        self._units.release()
        self.dropped, self._dropped_parameters, self._draw_key = (), [], None
        self._lr.detach()
        self._sync.close()

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
                f"LayerDropBack resumes with seed={explicit}, but the checkpoint was made with seed {seed}, so the"
                f" draws differ from the run's. Pass seed={seed} or seed=None to continue them."
            )
        elif seed is not None:
            self.seed = int(seed)
        run_order = state_dict.get("run_order")
        self.run_order = list(run_order) if run_order is not None else None
        if self._units.layers or self.run_order:
            self._discover()
        self.steps = int(state_dict.get("steps", self.steps))

    # ------------------------------------------------------------------ internals
    def _resolve_seed(self) -> int:
        seed = self.settings.seed
        if seed is None:
            seed = global_seed()
            if seed is None:
                seed = fresh_seed()
                _log.info("LayerDropBack: no `seed` and no `seed_everything`; drawing with seed %d.", seed)
        return int(self._sync.broadcast(seed))  # one seed for all ranks, whatever each process was seeded with

    def _warn_nothing_to_drop(self, epoch: int) -> None:
        # With a frozen backbone (a linear probe, the epochs before ``BackboneFinetuning`` unfreezes) every DROP
        # epoch is like this, yet the LR (and batch) scaling still apply: a user must not find that out from a curve.
        s = self.settings
        applies = f"the learning rate x lr_scale={s.lr_scale}"
        if self._batch_scaled:
            applies += f" and the batch x batch_scale={s.batch_scale}"
        elif self._batch_scaled is None and s.batch_scale > 1:
            applies += f" (and the batch x batch_scale={s.batch_scale} where the loop takes ldb.batch_size())"
        warn_on_rank_zero(
            f"LayerDropBack: DROP epoch {epoch} has no layer to drop: {self._units.why_no_candidates()}. It still"
            f" trains with {applies}; lower keep_first/keep_last or widen include/exclude if unintended."
        )

    def _warn_no_run_order(self, epoch: int) -> None:
        # The order comes from a training step (epoch 0, never a DROP epoch, shows it). A loop that starts on a DROP
        # epoch (epochs counted from 1 with every=1) or a resume without LDB's state draws before it has seen one.
        s = self.settings
        warn_on_rank_zero(
            f"LayerDropBack: DROP epoch {epoch} draws before LDB has seen a training step, so keep_first="
            f"{s.keep_first}/keep_last={s.keep_last} count layers in registration order. Start with a full epoch or"
            " load the run's state_dict."
        )

    def _warn_if_no_optimizer(self) -> None:
        # Without a hooked optimizer no step is seen: the LR is not scaled, resample="step" never draws again and the
        # run order (what keep_first/keep_last count) is never confirmed. The plain loop would train on, unscaled.
        if self._lr.is_attached() or self._warned_no_optimizer:
            return
        self._warned_no_optimizer = True
        warn_on_rank_zero(
            f"LayerDropBack.epoch(): no optimizer is hooked, so lr_scale={self.settings.lr_scale} is not applied and"
            " no step is seen. Pass LayerDropBack(model, optimizer) or call ldb.hook_optimizers([optimizer])."
        )

    def _warn_about_composition(self, optimizers: Sequence[Optimizer], who: str = "LayerDropBack") -> None:
        # Once, when the units are known: under the Trainer at fit start (the callback, with the trainer's optimizers),
        # in a plain loop at the first epoch. What other torch features make of LDB, said by both drivers.
        if self._warned_composition or not self.candidates:
            return
        self._warned_composition = True
        self._warn_if_compiled(who)
        self._warn_if_all_droppable(who)
        self._warn_if_an_optimizer_can_lose_all_its_layers(optimizers, who)

    def _warn_if_compiled(self, who: str) -> None:
        # Each new dropped set recompiles a compiled graph that holds a candidate.
        if self._model_compiled or _compat.is_compiled_lightning_module(self.module):
            kind = "LightningModule" if _compat.is_compiled_lightning_module(self.module) else "model"
            what = f"the {kind} {type(self.module).__name__}"
        else:
            holders = compiled_holders(self.module, self.candidates)
            if not holders:
                return
            what = describe_compiled(holders)
        warn_on_rank_zero(recompile_warning(who, what))

    def _warn_if_all_droppable(self, who: str) -> None:
        # Checked after every callback's ``setup`` (``BackboneFinetuning`` freezes there). A draw that drops every
        # trainable layer leaves the loss without a gradient: the step fails, at random, mid-run.
        drop_rate, candidates = self.settings.drop_rate, self.candidates
        if drop_rate == 0.0:
            return
        candidate_ids = {id(p) for layer in candidates for p in layer.parameters}
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        if not trainable or not all(id(p) in candidate_ids for p in trainable):
            return
        n = sum(1 for layer in candidates if any(p.requires_grad for p in layer.parameters))
        warn_on_rank_zero(
            f"{who}: every trainable layer of {type(self.module).__name__} is a candidate, so a draw drops all {n}"
            f" with probability {drop_rate**n:.2g} and the loss has no gradient. Keep one: keep_first/keep_last >= 1"
            " or `exclude`."
        )

    def _warn_if_an_optimizer_can_lose_all_its_layers(self, optimizers: Sequence[Optimizer], who: str) -> None:
        # That optimizer then trains nothing for the draw, and a loss whose only trainable inputs are its layers
        # (a GAN's generator step under ``toggle_optimizer``, which freezes the other optimizers' parameters) has no
        # gradient: backward fails with torch's "element 0 of tensors does not require grad". With one optimizer,
        # ``_warn_if_all_droppable`` covers it.
        drop_rate, candidates = self.settings.drop_rate, self.candidates
        if drop_rate == 0.0 or len(optimizers) < 2:
            return
        found = []
        for index, optimizer in enumerate(optimizers):
            trainable = {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}
            holding = [layer for layer in candidates if any(id(p) in trainable for p in layer.parameters)]
            covered = {id(p) for layer in holding for p in layer.parameters}
            if trainable and trainable <= covered:
                found.append((index, optimizer, holding))
        if not found:
            return
        what = "; ".join(
            f"optimizer {index} ({type(optimizer).__name__}): all {len(holding)} of its layers with probability"
            f" drop_rate**{len(holding)} = {drop_rate ** len(holding):.2g}"
            for index, optimizer, holding in found
        )
        last = found[0][2][-1].name
        warn_on_rank_zero(
            f"{who}: one draw can drop every layer an optimizer trains ({what}); a loss of only those layers (a GAN"
            f" step under toggle_optimizer) then has no gradient. Keep one trained, e.g. exclude=[{last!r}]."
        )

    def _note_dropped_layers(self, exception: BaseException, who: str = "LayerDropBack") -> None:
        # torch's "does not require grad", raised while layers were dropped: say why, and the fix.
        dropped = self.dropped_layers
        if not dropped or not isinstance(exception, RuntimeError) or "does not require grad" not in str(exception):
            return
        shown = ", ".join(dropped[:5]) + (f" and {len(dropped) - 5} more" if len(dropped) > 5 else "")
        note = (
            f"{who} had dropped (frozen) {shown} for this step; a loss of only dropped layers has no gradient (a GAN"
            " step under toggle_optimizer). Keep one trained: `exclude` it, or raise keep_first/keep_last."
        )
        if hasattr(exception, "add_note"):  # Python 3.11+
            exception.add_note(note)
        else:  # Python 3.10 (still supported): say it once beside the traceback
            warn_on_rank_zero(note)

    def _warn_if_step_unseen(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # An optimizer made after the engine (recreated each epoch, say) steps the model unscaled and unseen. Only one
        # that holds the model's parameters: another model's optimizer (a GAN's discriminator) is none of LDB's business.
        if self._warned_no_optimizer or self._lr.is_attached(optimizer) or optimizer in self._foreign_optimizers:
            return
        self._foreign_optimizers.add(optimizer)  # checked once, not at every step (a GAN's other optimizer)
        own = {id(p) for p in self.module.parameters()}
        if not any(id(p) in own for group in optimizer.param_groups for p in group["params"]):
            return
        self._warned_no_optimizer = True
        warn_on_rank_zero(
            f"LayerDropBack.epoch(): a {type(optimizer).__name__} that LDB was not given steps the model, so lr_scale="
            f"{self.settings.lr_scale} is not applied to it. Call ldb.hook_optimizers([optimizer]) after making it."
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
        if not self._driving or not self._freezer.frozen:
            return  # under the Trainer the callback gives the placeholders (``on_after_backward``)
        frozen = {id(p) for p in self._freezer.frozen}
        for optimizer in self._lr.attached():
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
        if self._draw_key is None and not self._freezer.frozen:
            return
        self._units.release()
        self.dropped, self._dropped_parameters, self._draw_key = (), [], None
        self._sync.on_trainable_set_changed(None, ())

    def _stop_recorder(self) -> list[str]:
        recorder, self._recorder = self._recorder, None
        return recorder.stop() if recorder is not None else []

    def _before_step(self, optimizer: Optimizer) -> None:
        # A ``zero_grad(set_to_none=False)`` would leave dropped parameters a zero gradient, which momentum and
        # weight decay still act on. Only this optimizer's: another one's scaler placeholder must last until its step.
        self._freezer.clear_grads(optimizer)

    def _after_step(self, optimizer: Optimizer) -> None:
        if self._driving:
            self.steps += 1
            self._stepped = True

    def _before_model_forward(self, module: nn.Module, args: Any) -> None:
        # A step that raised (caught by a "skip this batch" handler) leaves the LR it scaled: put it back before the
        # next forward, not only at the next step. Here only, not in every module's hook: inside a closure's forward
        # a step is running, and finding that out walks the stack.
        self._lr.recover()
        self._before_forward(module, args)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        # The first forward after an optimizer step: the step's run order is complete, and with resample="step" the
        # next step gets its own draw. Micro-batches of one accumulated step share a draw (no step in between).
        if not self._stepped:
            return
        self._stepped = False
        self._finish_run_order()
        if self.mode == DROP and self.settings.resample == "step" and self._epoch is not None:
            self._draw(self._epoch, self.steps)


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
        model = inner  # type: ignore[assignment]  # a wrapper's module is a Module


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


def _optimizer_list(optimizers: Optimizer | Iterable[Any] | None) -> list[Any]:
    if optimizers is None:
        return []
    if isinstance(optimizers, Optimizer) or hasattr(optimizers, "param_groups"):
        return [optimizers]
    return list(optimizers)

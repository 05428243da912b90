"""LDB under Lightning's ``ModelParallelStrategy`` with FSDP2 (``fully_shard``) data parallelism.

With FSDP2 the user's ``configure_model`` calls ``torch.distributed.fsdp.fully_shard`` on the model
(usually once per block and once on the root). Every parameter becomes a ``DTensor`` sharded along
dim 0 over the data-parallel ranks; each forward all-gathers a group's parameters, and after the
backward each group reduce-scatters the gradients its parameters received.

Nothing in FSDP2 has to be told that LDB changed ``requires_grad`` (measured with torch 2.14, see
``docs/fsdp.md`` and ``benchmarks/fsdp_communication.py``):

* The flag is set on the sharded ``DTensor`` parameter; FSDP2 copies it to the unsharded
  parameter at every all-gather, so a flag changed between steps takes effect at the next forward.
* After the backward, a group reduce-scatters only the parameters that received a gradient
  (``set_reduce_scatter_unused_params(True)`` adds zeros only for parameters that *require* one),
  so a dropped parameter is not communicated at all, and a group whose parameters are all dropped
  issues no reduce-scatter. Its sharded ``grad`` stays ``None``, so no optimizer moves it.
* Forward (and, with ``reshard_after_forward``, backward) all-gathers are unchanged: the forward
  needs the dropped layers' weights, and so does the backward for the gradient of their input.

What LDB must guarantee is that every rank drops the same layers: a rank that reduce-scatters a
group another rank skips pairs the wrong collectives (a hang or mixed-up gradients). The draws
agree by construction (seed broadcast from rank 0); :class:`~lightning_ldb.distributed.CrossRankDrawCheck`
verifies it with one 8-byte all-gather per draw, before the forward that would use it.

Only data parallelism is served: tensor parallelism (``tensor_parallel_size > 1``) is refused in
:meth:`FSDP2Adapter.setup`.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer

from lightning_ldb.distributed import CrossRankDrawCheck
from lightning_ldb.schedule import DrawKey
from lightning_ldb.undo import UndoList

#: The name Lightning's ``ModelParallelStrategy`` gives the tensor-parallel dimension of its device mesh.
TENSOR_PARALLEL_DIM = "tensor_parallel"


# ------------------------------------------------------------------------------------------------ private access
# None. Everything below uses public API only, checked with lightning 2.6 and torch 2.14:
# ``ModelParallelStrategy.device_mesh`` (public property, set in ``setup_environment``, which Lightning runs before
# any callback's ``setup``) and ``DeviceMesh.mesh_dim_names`` / ``DeviceMesh.__getitem__`` / ``DeviceMesh.size``.


def tensor_parallel_size(device_mesh: Any) -> int:
    """The size of ``device_mesh``'s tensor-parallel dimension (``1`` if it has none).

    Args:
        device_mesh: The strategy's ``torch.distributed.device_mesh.DeviceMesh``.

    Example::

        >>> class Mesh:  # a stand-in with DeviceMesh's interface
        ...     mesh_dim_names = ("data_parallel", "tensor_parallel")
        ...     def __getitem__(self, name): return type("Sub", (), {"size": lambda self: 4})()
        >>> tensor_parallel_size(Mesh())
        4
    """
    names = getattr(device_mesh, "mesh_dim_names", None) or ()
    if TENSOR_PARALLEL_DIM not in names:
        return 1
    return int(device_mesh[TENSOR_PARALLEL_DIM].size())


class FSDP2Adapter:
    """Serves LDB under ``ModelParallelStrategy`` when the model is sharded with FSDP2 ``fully_shard`` only.

    FSDP2 needs no reconfiguration when LDB changes the trainable set (see the module docstring);
    the adapter refuses tensor parallelism and checks that every rank drew the same layers.

    Args:
        resample: The callback's ``resample`` (``"epoch"``: every draw is checked at once;
            ``"step"``: checked once per DROP epoch, see :class:`~lightning_ldb.distributed.CrossRankDrawCheck`).

    Raises:
        ValueError: If ``resample`` is neither ``"epoch"`` nor ``"step"``.

    Example::

        >>> FSDP2Adapter(resample="epoch").check.per_draw
        True
    """

    def __init__(self, resample: str) -> None:
        if resample not in ("epoch", "step"):
            raise ValueError(f"resample={resample!r} is not a resample mode; use 'epoch' or 'step'.")
        self.resample = resample
        self.check = CrossRankDrawCheck(per_draw=resample == "epoch")

    def setup(self, trainer: Trainer, pl_module: LightningModule, undo: UndoList) -> None:
        """Refuse tensor parallelism; runs in the callback's ``setup``, after the device mesh exists.

        Raises:
            ValueError: If the strategy's device mesh has a tensor-parallel dimension larger than 1.
        """
        self.check = CrossRankDrawCheck(per_draw=self.resample == "epoch")
        size = tensor_parallel_size(trainer.strategy.device_mesh)  # type: ignore[attr-defined]
        if size > 1:
            raise ValueError(
                f"LayerDropBackCallback does not support tensor parallelism (ModelParallelStrategy with"
                f" tensor_parallel_size={size}): a tensor-parallel layer's parameters are split across ranks that"
                " compute one forward together, and LDB has not been made to drop such a layer consistently. Use"
                " ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1) with"
                " `fully_shard` applied in `configure_model` (FSDP2 data parallelism), or remove LayerDropBackCallback."
            )

    def on_trainable_set_changed(self, trainer: Trainer, draw_key: Optional[DrawKey], dropped: tuple[str, ...]) -> None:
        """Check that every rank agrees on the draw; FSDP2 itself needs nothing.

        Args:
            trainer: The running trainer.
            draw_key: ``(epoch, step or None)`` of the draw, or ``None`` when LDB released every layer.
            dropped: Names of the layers dropped now (empty on release).

        Raises:
            RuntimeError: If the ranks disagree on the dropped layers (raised on every rank).
        """
        if draw_key is None:
            self.check.on_release(trainer.strategy)
        else:
            self.check.on_draw(trainer.strategy, draw_key, dropped)

    def close(self) -> None:
        """Nothing to let go of: FSDP2 holds no LDB state."""

"""megatron's TensorBoard and wandb writers, opened after the output directory is prepared.

megatron opens its writers inside ``output_dir`` when ``set_global_variables`` runs, and ``overwrite=true``
clears ``output_dir`` afterwards (``MegatronRun.prepare_output_dir``, on rank 0 once the process group
exists). The writer's open event file would be deleted under it and its first flush would end the run
(``FileNotFoundError`` from TensorBoard's writer thread, seen on an H200 when a run was repeated into the
same directory). So the entry sets megatron's globals with the writers' arguments held back
(:func:`defer_writers`) and opens them with megatron's own setters once the directory is ready
(:func:`open_writers`).
"""
from __future__ import annotations

from typing import Any, Optional

WRITER_ARGS = ("tensorboard_dir", "wandb_project")


def defer_writers(args) -> dict[str, Any]:
    """Hold back the writers' arguments from ``args`` (before ``set_global_variables``); returns them."""
    saved = {k: getattr(args, k, None) for k in WRITER_ARGS}
    args.tensorboard_dir, args.wandb_project = None, ""
    return saved


def open_writers(args, saved: Optional[dict[str, Any]]) -> None:
    """Restore the held-back arguments and open megatron's writers (on the last rank, as megatron does)."""
    if saved is None:
        return
    from megatron.training import global_vars

    args.tensorboard_dir = saved["tensorboard_dir"]
    args.wandb_project = saved["wandb_project"] or ""
    global_vars._set_tensorboard_writer(args)
    global_vars._set_wandb_writer(args)

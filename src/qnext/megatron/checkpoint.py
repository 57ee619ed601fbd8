"""Checkpoint directories of the Megatron backend: where to start from, what must be in them, what to keep.

A run writes ``<output_dir>/checkpoints`` in megatron.training's own layout (``iter_XXXXXXX/`` +
``latest_checkpointed_iteration.txt``, torch_dist, distributed-optimizer state included), so an
interrupted run resumes with ``resume=auto``. A fresh run starts from ``model.megatron_checkpoint``,
the ``make convert`` output: a release checkpoint (weights only) that megatron.training loads through
``--pretrained-checkpoint`` (iteration 0, new optimizer). Before that load, ``missing_base_keys``
checks that it holds every weight the model needs: megatron's load is told to tolerate absent keys
(the converted checkpoint has no Transformer Engine ``_extra_state`` and no LoRA tensors), so
without this check a wrong checkpoint would leave weights at their random initialisation.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..config.schema import RecipeConfig
from ..config.validate import resolve_path
from ..errors import UserError

CHECKPOINTS_SUBDIR = "checkpoints"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
EXTRA_STATE_SUFFIX = "_extra_state"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class CheckpointPlan:
    """Where megatron.training loads from and saves to.

    ``load`` is tried first (a Megatron save root); when it holds no checkpoint megatron falls back
    to ``pretrained`` (a release checkpoint: weights only, iteration 0).
    """

    save: str
    load: str
    pretrained: Optional[str]
    resuming: bool  # ``load`` holds a checkpoint of a run: every key must be there


def has_checkpoint(save_root: str | os.PathLike) -> bool:
    return (Path(save_root) / TRACKER_FILE).is_file()


def pretrained_root(path: str | os.PathLike, key: str = "model.megatron_checkpoint") -> Path:
    """A Megatron save root (``latest_checkpointed_iteration.txt`` + ``release/`` or ``iter_*/``)."""
    p = Path(path)
    if has_checkpoint(p):
        return p
    if (p / ".metadata").is_file() and has_checkpoint(p.parent):
        raise UserError(f"{key}={path} is the checkpoint's {p.name}/ directory",
                        hint=f"pass its parent {p.parent} (the directory `make convert` wrote)")
    raise UserError(f"{key}={path}: no {TRACKER_FILE} there, so it is not a Megatron torch_dist checkpoint",
                    hint="pass the OUT directory of `make convert HF=... OUT=...`")


def checkpoint_plan(cfg: RecipeConfig) -> CheckpointPlan:
    """Resume from ``<output_dir>/checkpoints`` (resume=auto) or a given save root, else start from
    ``model.megatron_checkpoint``. Reads the file system; changes nothing."""
    save = Path(cfg.output_dir).expanduser() / CHECKPOINTS_SUBDIR
    if cfg.resume not in ("auto", "never"):
        load = resolve_path(cfg.resume)
        assert load is not None
        if not has_checkpoint(load):
            raise UserError(f"resume={cfg.resume}: no {TRACKER_FILE} in {load}",
                            hint="point resume at the checkpoints/ directory of an earlier Megatron run")
        return CheckpointPlan(str(save), str(load), None, resuming=True)
    resuming = cfg.resume == "auto" and not cfg.overwrite and has_checkpoint(save)
    pretrained = resolve_path(cfg.model.megatron_checkpoint)
    return CheckpointPlan(str(save), str(save), None if pretrained is None else str(pretrained), resuming)


def iteration_dir(save_root: str | os.PathLike) -> Path:
    """The directory the tracker points at (``release`` or ``iter_XXXXXXX``)."""
    root = Path(save_root)
    text = (root / TRACKER_FILE).read_text().strip()
    return root / ("release" if text == "release" else f"iter_{int(text):07d}")


def checkpoint_tensor_keys(save_root: str | os.PathLike) -> set[str]:
    """Every tensor key stored in the checkpoint the tracker points at (reads metadata only)."""
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(iteration_dir(save_root))))


def model_tensor_keys(model) -> set[str]:
    """The checkpoint keys of this rank's tensors (TP/EP/PP shards name their global tensor)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from .model import _sharded_metadata

    sd = model.sharded_state_dict(metadata=_sharded_metadata())
    apply_factories(sd)
    return {v.key for v in nested_values(sd) if isinstance(v, ShardedTensor)}


def missing_base_keys(model, checkpoint_keys: Iterable[str], model_keys: Optional[set[str]] = None) -> list[str]:
    """Tensors ``model`` needs that the checkpoint lacks (TE ``_extra_state`` excepted)."""
    have = set(checkpoint_keys)
    want = model_tensor_keys(model) if model_keys is None else model_keys
    return sorted(k for k in want if k not in have and not k.endswith(EXTRA_STATE_SUFFIX))


def prune_checkpoints(save_root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest ``iter_*`` directories (never the one the tracker names)."""
    root = Path(save_root)
    if not has_checkpoint(root):
        return []
    current = iteration_dir(root).name
    iters = sorted((p for p in root.iterdir() if p.is_dir() and _ITER_DIR.match(p.name)), key=lambda p: p.name)
    doomed = [p for p in iters[:-keep] if p.name != current] if keep > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------ saving policy
def should_save(step: int, stop: int, total: int, save_every: int, save_final: bool) -> bool:
    """Whether the Megatron entry writes a checkpoint after ``step``: every ``train.save_every`` steps
    (0: never periodically), at the last step with ``train.save_final``, and always where
    ``train.stop_after`` ends the run early (to resume from). megatron's own ``--save-interval`` is
    not used here: it must be set whenever ``--save`` is, so it holds the run's length when
    ``save_every`` is 0, and reading it back would save at the last step despite ``save_final=false``."""
    if save_every > 0 and step % save_every == 0:
        return True
    return step == stop and (save_final or stop < total)


def checkpoint_bytes(weight_bytes: int, trained_numel: int, with_optimizer: bool = True) -> int:
    """Bytes of one torch_dist checkpoint of the whole model: every weight as stored (frozen LoRA base
    weights included), plus for each trained weight the distributed optimizer's fp32 main copy and
    Adam's two moments (12 B), unless the optimizer is not saved."""
    return int(weight_bytes) + (12 * int(trained_numel) if with_optimizer else 0)


def disk_check(need: int, free: int, keep: int, where: str) -> Optional[str]:
    """None when ``free`` bytes hold the checkpoints the run will keep; a warning when they hold one
    checkpoint but not ``keep`` + 1 (the newest is written before the oldest is pruned); UserError
    when not even one fits (instead of a torch_dist write error at the first save, hours in)."""
    gib = 1024**3
    if need > free:
        raise UserError(
            f"one checkpoint of this run needs about {need / gib:.1f} GiB, and {where} has {free / gib:.1f} GiB free",
            hint="free disk space, set output_dir to a larger disk, or train without checkpoints "
                 "(train.save_every=0 train.save_final=false); train.check_disk=false starts anyway")
    want = need * (max(int(keep), 1) + 1)
    if want > free:
        return (f"{where} has {free / gib:.1f} GiB free: one checkpoint (~{need / gib:.1f} GiB) fits, but keeping "
                f"{keep} needs ~{want / gib:.1f} GiB while the next one is written (train.keep_checkpoints)")
    return None



"""Training checkpoints: atomic, resumable exactly, and readable at another world size.

Layout of ``<output_dir>/checkpoints/step_0000006/``::

    .metadata, __*.distcp   model (trainable parameters only for LoRA) + optimizer, torch.distributed.checkpoint
    rng_rank{r}.pt          every RNG of rank r (torch, cuda, python, numpy)
    trainer_state.json      step, learning rate, data position, world size, config digest
    adapter/                LoRA only: the PEFT adapter at this step (adapter_config.json + safetensors)

Everything is written into ``.step_0000006.tmp-*`` and renamed when complete, so a crash leaves
either a whole checkpoint or none; ``latest_checkpoint`` ignores temporaries. The data position
equals the step (the sampler is a function of the step), and the learning rate is a function of the
step, so nothing else is needed for exact resume.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..errors import UserError
from ..fsutil import atomic_write_json

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Complete checkpoints (a trainer_state.json inside, not a temporary), oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append(CheckpointInfo(p, int(m.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(output_dir: str | os.PathLike) -> CheckpointInfo | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise UserError(f"{path} is not a training checkpoint (no {STATE_FILE})",
                        hint="point resume= at a directory under <output_dir>/checkpoints/, or use resume=auto")
    return json.loads(f.read_text())


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_dict_options(trainable_only: bool, loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # loading a trainable-only state dict leaves the frozen weights "missing": not strict, checked below
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not (loading and trainable_only))


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    *,
    rank: int,
    trainable_only: bool,
    keep: int,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(output_dir) / CKPT_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_dict_options(trainable_only))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if write_extra is not None:
        write_extra(tmp)  # collective too (e.g. gathering the adapter); rank 0 writes
    _barrier()
    if rank == 0:
        state = dict(trainer_state)
        state.update(step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        atomic_write_json(tmp / STATE_FILE, state)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a rerun with overwrite of this step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune_checkpoints(output_dir, keep)
    _barrier()
    return final


def prune_checkpoints(output_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    for ck in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(ck.path, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int,
    world_size: int,
    trainable_only: bool,
) -> dict[str, Any]:
    """Collective: restore model + optimizer (resharding as needed) and, at the same world size,
    each rank's RNG. Returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = read_state(path)
    opts = _state_dict_options(trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    both = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(both, checkpoint_id=str(path))
    except Exception as err:  # a checkpoint from another recipe (other targets, other mode)
        raise UserError(
            f"cannot load checkpoint {path}: {str(err).splitlines()[0][:300]}",
            hint="resume with the recipe that wrote it (same train.mode and LoRA targets), or start a new output_dir",
        ) from None
    result = set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optim"],
                            options=_state_dict_options(trainable_only, loading=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trained]
    unexpected = list(getattr(result, "unexpected_keys", []))
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
                        hint="resume with the recipe that wrote it (same train.mode and LoRA targets)")
    rng = path / f"rng_rank{rank}.pt"
    if state.get("world_size") == world_size and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

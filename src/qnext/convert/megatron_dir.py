"""The directory layout Megatron-LM's ``--load`` expects, and the HF files we keep beside it.

```
<ckpt>/latest_checkpointed_iteration.txt   "release" (what we write) or an iteration number
<ckpt>/release/ | iter_0000123/            one torch_dist checkpoint per iteration:
    .metadata  __<n>_0.distcp ...          DCP metadata + data files
    common.pt                              non-tensor state (checkpoint_version, iteration, ...)
    metadata.json                          {"sharded_backend": "torch_dist", ...}
    run_config.yaml                        what Megatron-Bridge's loader and AutoBridge read (our layout)
<ckpt>/hf/                                 config.json, tokenizer, generation_config, the original
                                           index and shard layout, conversion record
```
A ``release`` checkpoint is Megatron's name for converted weights: ``megatron.training`` loads it
at iteration 0 and never looks for optimizer or RNG state in it, with or without ``--finetune``.
``common.pt`` is megatron-core's legacy common-state file, which 0.19.2 still reads first (its own
saves put the same dict in a ``common_state`` object inside the DCP files instead) and which
older Megatron-LM versions (slime's) require. ``run_config.yaml`` is Megatron-Bridge's run record
(read at NVIDIA-NeMo/Megatron-Bridge 067f987): its loader reads ``model.{tensor,pipeline}_model_parallel_size``
and ``checkpoint.{save_rng,save_optim,fully_parallel_save}`` from it (else it wants pickled ``args`` in
the common state, which a converted checkpoint does not have), and ``AutoBridge`` builds the model
config from its ``model`` section.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from ..fsutil import atomic_write_text

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = "run_config.yaml"
RELEASE = "release"
HF_META = "hf"
CHECKPOINT_VERSION = 3.0  # what megatron.training.checkpointing writes
# Files of an HF checkpoint that are not weights and travel with the conversion.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
)


def make_world_readable(path: Path) -> None:
    """``tempfile.mkdtemp`` makes 0700 directories; a checkpoint should follow the umask like any
    directory (other ranks, other users of a shared cluster account)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o777 & ~mask)


def iteration_dir_name(iteration: int | str) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def resolve_iteration_dir(ckpt: str | os.PathLike) -> Path:
    """The torch_dist directory a Megatron ``--load <ckpt>`` would read (or ``ckpt`` itself when it
    is an iteration directory)."""
    ckpt = Path(ckpt)
    if (ckpt / ".metadata").is_file() and (ckpt / "metadata.json").is_file():
        return ckpt
    tracker = ckpt / TRACKER
    if not tracker.is_file():
        raise UserError(
            f"{ckpt} has no {TRACKER} (and is not an iteration directory)",
            hint="point at a checkpoint written by `make convert` or by a Megatron run that finished saving",
        )
    text = tracker.read_text().strip()
    if text != RELEASE:
        try:
            int(text)
        except ValueError:
            raise UserError(f"{tracker} holds {text!r}, expected 'release' or an iteration number") from None
    it = ckpt / iteration_dir_name(text if text == RELEASE else int(text))
    if not (it / ".metadata").is_file():
        raise UserError(f"{it} is missing or incomplete (no .metadata)", hint="the save did not finish")
    return it


def write_common(iteration_dir: Path, extra: dict) -> None:
    """``common.pt`` with what megatron.training reads from a release checkpoint."""
    state = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        # dist_checkpointing.load_content_metadata(): how the model's sharded state dict was built
        "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True},
        "qnext": extra,
    }
    torch.save(state, iteration_dir / "common.pt")


def read_common(iteration_dir: Path) -> dict:
    path = iteration_dir / "common.pt"
    if not path.is_file():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a training run's common.pt holds pickled args: not needed here
        return {}


def write_run_config(iteration_dir: Path, hf_config: dict, source: Path | str | None = None, *, mtp: bool = False) -> Path:
    """Megatron-Bridge's ``run_config.yaml`` for a converted (release, unsharded) checkpoint."""
    import yaml

    from ..models.megatron_args import bridge_model_config

    run = {
        "model": bridge_model_config(hf_config, mtp=mtp, hf_model_id=str(source) if source else None),
        # a release checkpoint carries weights only
        "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": False},
    }
    path = iteration_dir / RUN_CONFIG
    atomic_write_text(path, "# written by qnext (make convert) for Megatron-Bridge's checkpoint loader and AutoBridge\n"
                      + yaml.safe_dump(run, sort_keys=False))
    return path


def write_backend_config(iteration_dir: Path) -> None:
    (iteration_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))


def write_tracker(ckpt: Path, iteration: int | str = RELEASE) -> None:
    tmp = ckpt / f".{TRACKER}.tmp"
    tmp.write_text(f"{iteration}\n" if iteration != RELEASE else RELEASE)
    os.replace(tmp, ckpt / TRACKER)


def copy_hf_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and generation config (whatever of HF_SIDE_FILES exists)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def hf_meta_dir(ckpt: str | os.PathLike) -> Path | None:
    """``<ckpt>/hf`` if the checkpoint root (or the root above an iteration dir) has one."""
    ckpt = Path(ckpt)
    is_iteration_dir = (ckpt / ".metadata").is_file()
    for root in (ckpt.parent,) if is_iteration_dir else (ckpt,):
        if (root / HF_META / "config.json").is_file():
            return root / HF_META
    return None


def copy_hf_meta(src_ckpt: str | os.PathLike, dst_ckpt: str | os.PathLike) -> Path | None:
    """Carry ``hf/`` from a converted checkpoint into a training run's save directory, so that
    ``make export`` of the run needs no ``--hf-meta``. Returns the new directory (None if the
    source has none)."""
    src = hf_meta_dir(src_ckpt)
    if src is None:
        return None
    dst = Path(dst_ckpt) / HF_META
    if dst.exists():
        return dst
    shutil.copytree(src, dst)
    return dst

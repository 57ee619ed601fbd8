"""Everything the Megatron entry decides before a process group exists (``prepare``): the recipe
composed and validated against the world size, recompute resolved for this GPU (``qnext.plan``), fresh
start or resume from the output directory (``qnext.rundir``), the layer back end (TE when it imports),
the converted checkpoint checked against the model, and the megatron.training argument list
(``qnext.megatron.args``). Each failure is a :class:`~qnext.errors.UserError` naming the key to change."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .. import rundir
from ..config import RecipeConfig, load_config, validate_config
from ..errors import UserError
from .args import megatron_argv
from .checkpoint import CheckpointPlan, checkpoint_plan, has_checkpoint, pretrained_root


@dataclass(frozen=True)
class Prepared:
    """Everything decided before a process group exists."""

    cfg: RecipeConfig
    hf: dict[str, Any]
    ckpt: CheckpointPlan
    use_te: bool
    argv: list[str]
    world_size: int
    clear_output: bool
    recompute_note: str = ""


def plan_output_dir(cfg: RecipeConfig, ckpt: CheckpointPlan) -> bool:
    """The shared run-directory policy (``qnext.rundir``) with this backend's checkpoints
    (``<output_dir>/checkpoints/latest_checkpointed_iteration.txt``); True when the directory's contents
    must be replaced before the run writes anything."""
    return rundir.plan_output_dir(cfg, lambda out: has_checkpoint(ckpt.save)).clear


def _checkpoint_hf_config(pretrained: Optional[str]) -> Optional[dict[str, Any]]:
    if not pretrained:
        return None
    from ..convert.megatron_dir import hf_meta_dir

    meta = hf_meta_dir(pretrained)
    return json.loads((meta / "config.json").read_text()) if meta is not None else None


def prepare(overrides: Sequence[str], world_size: Optional[int] = None, use_te: Optional[bool] = None) -> Prepared:
    """Everything that can fail on user input, before any process group or GPU is touched."""
    from ..models.qwen3_next import Qwen3NextDims
    from .spec import te_importable

    from ..metrics import profile_step_wanted
    from .attention import packed_attention_mode

    profile_step_wanted(0)  # a malformed QNEXT_PROFILE_STEP fails here, not after the model loaded
    from ..syncs import sync_check_wanted

    sync_check_wanted(0)  # likewise QNEXT_SYNC_CHECK
    packed_attention_mode()  # likewise QNEXT_PACKED_ATTENTION
    cfg = load_config(list(overrides))
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.parallel.backend != "megatron":
        raise UserError(f"parallel.backend={cfg.parallel.backend}: this is the Megatron entry point",
                        hint="pick a Megatron layout (parallel=8xh100, parallel=4x8, parallel=1gpu) or use scripts/run-fsdp.sh")
    hf = validate_config(cfg, world_size=world)
    from ..plan import resolve_recompute

    cfg, recompute_note = resolve_recompute(cfg, world, _gpu_memory_bytes())
    ckpt = checkpoint_plan(cfg)
    if not ckpt.resuming:
        if ckpt.pretrained is None:
            raise UserError("model.megatron_checkpoint is not set and the output directory holds no checkpoint to resume",
                            hint="pass model.megatron_checkpoint=<the OUT of `make convert HF=... OUT=...`>")
        pretrained_root(ckpt.pretrained)
        ckpt_hf = _checkpoint_hf_config(ckpt.pretrained)
        if ckpt_hf is not None and Qwen3NextDims.from_hf_config(ckpt_hf) != Qwen3NextDims.from_hf_config(hf):
            raise UserError(f"model.megatron_checkpoint={cfg.model.megatron_checkpoint} was converted from a model "
                            f"other than model.hf_config={cfg.model.hf_config} (layers, widths or experts differ)",
                            hint="pick the model=... that matches the checkpoint")
    clear = plan_output_dir(cfg, ckpt)
    te = te_importable() if use_te is None else use_te
    argv = megatron_argv(cfg, hf, use_te=te, ckpt=ckpt)
    return Prepared(cfg, hf, ckpt, te, argv, world, clear, recompute_note)


def _gpu_memory_bytes() -> Optional[int]:
    """This node's GPU memory (the first visible GPU), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory



"""Everything the FSDP entry decides before a process group exists (``prepare``): the recipe composed
and validated, the HF checkpoint found, and fresh start or resume from the output directory by the
shared run-directory policy (``qnext.rundir``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .. import rundir
from ..config import RecipeConfig, load_config, validate_config
from ..config.validate import resolve_path
from ..errors import UserError
from . import checkpoint as ckpt
from .dist import world_size_from_env

# --------------------------------------------------------------------------- output directory


@dataclass(frozen=True)
class RunPlan:
    output_dir: Path
    resume_from: Path | None  # a complete checkpoint to continue from
    clear: bool  # delete the directory's contents first (overwrite=true, or our own run with no checkpoint)


def plan_output_dir(cfg: RecipeConfig) -> RunPlan:
    """Fresh / resume / refuse by the shared run-directory policy (``qnext.rundir``; read-only, every rank
    agrees), with this backend's checkpoints (``<output_dir>/checkpoints/step_*``)."""
    p = rundir.plan_output_dir(cfg, lambda out: ckpt.latest_checkpoint(out) is not None)
    if p.explicit_resume is not None:
        ckpt.read_state(p.explicit_resume)  # raises a clear error when it is not a checkpoint
        return RunPlan(p.output_dir, p.explicit_resume, p.clear)
    last = ckpt.latest_checkpoint(p.output_dir) if p.start == rundir.RESUME else None
    return RunPlan(p.output_dir, last.path if last is not None else None, p.clear)


# --------------------------------------------------------------------------- set-up pieces


def checkpoint_dir(cfg: RecipeConfig) -> Path:
    if not cfg.model.checkpoint:
        raise UserError(
            "the FSDP backend trains from an HF checkpoint and model.checkpoint is not set",
            hint="pass model.checkpoint=<HF checkpoint dir> (a tiny random one: "
            "python -m qnext.models.tiny --out <dir>)",
        )
    path = resolve_path(cfg.model.checkpoint)
    assert path is not None
    if not (path / "config.json").is_file():
        raise UserError(f"model.checkpoint={cfg.model.checkpoint}: no config.json in {path}",
                        hint="point model.checkpoint at an HF checkpoint directory")
    return path


def tokenizer_dir(cfg: RecipeConfig, ckpt_dir: Path) -> Path | None:
    """``model.tokenizer``, else the HF checkpoint's own, else None (the built-in one): ``qnext.rundir``."""
    return rundir.find_tokenizer(cfg, [ckpt_dir])


def prepare(overrides: Sequence[str], world_size: int | None = None) -> tuple[RecipeConfig, dict[str, Any], RunPlan]:
    """Everything that can fail on user input, before any process group exists."""
    from ..metrics import profile_step_wanted

    profile_step_wanted(0)  # a malformed QNEXT_PROFILE_STEP fails here, not after the model loaded
    cfg = load_config(list(overrides))
    world = world_size or world_size_from_env()
    hf = validate_config(cfg, world_size=world)
    if cfg.parallel.backend != "fsdp":
        raise UserError(f"parallel.backend={cfg.parallel.backend}: this is the FSDP entry point",
                        hint="use parallel.backend=fsdp (e.g. parallel=cpu or parallel=fsdp), or the Megatron launcher")
    checkpoint_dir(cfg)
    plan = plan_output_dir(cfg)
    return cfg, hf, plan

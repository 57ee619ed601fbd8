"""Recipe -> the ``megatron.training`` argument list (a pure function), and its parse with megatron's parser.

``megatron_argv(cfg, hf, use_te=..., ckpt=...)`` renders one recipe as the flags
megatron.training reads: the model (``qnext.models.megatron_args``, the same flags as
``models/<name>.sh``), the parallel layout, recompute, batch sizes and sequence length, AdamW, the
cosine schedule with linear warmup, precision, the token-weighted loss, checkpoints and the
logging intervals. It reads nothing but its arguments, so a test can compare the list with
megatron's own parse (``parse_megatron_args``). ``python -m qnext.megatron.args recipe=... --world-size 8``
prints it (usable with Megatron-LM's ``pretrain_gpt.py`` or slime as well).

Checks that megatron would only make as an assertion deep inside its validation, or not at all,
are made first by ``check_megatron_recipe`` and name the recipe key to change.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..config.schema import RecipeConfig
from ..errors import UserError
from ..models.megatron_args import model_args
from .compat._patching import fixes_enabled
from .checkpoint import CheckpointPlan, checkpoint_plan

TENSORBOARD_SUBDIR = "tensorboard"

# recipe parallel.recompute -> megatron's recompute flags. "experts_act" recomputes only the routed
# experts' activation (SwiGLU x routing probability) in the backward instead of keeping its output: qnext's
# GroupedGemmExperts does that itself (megatron's "moe_act" accepts only its grouped-GEMM experts), so it
# has no megatron flag (qnext.megatron.provider sets the model's field); "experts" (qnext's too) recomputes the
# routed experts (the gather of their tokens, fc1, the activation, fc2) and keeps the router's and the shared
# expert's tensors, which megatron's "moe" module recomputes as well; "selective" recomputes the softmax
# attention core and the whole MoE block (router, token dispatch, 10 routed experts: the largest
# activations of Qwen3-Next); "full" recomputes every layer from its input.
RECOMPUTE = {
    "none": [],
    "experts_act": [],
    "experts": [],
    "selective": ["--recompute-granularity", "selective", "--recompute-modules", "core_attn", "moe"],
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}

# Fusions that need Transformer Engine / apex kernels; the TE-free stack turns them off (as
# qnext.megatron.config does for the TransformerConfig it builds).
TE_FREE_FLAGS = [
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--no-persist-layer-norm",
]


def check_megatron_recipe(cfg: RecipeConfig) -> list[str]:
    """Problems specific to the Megatron backend, each naming the recipe key to change."""
    p, t, d = cfg.parallel, cfg.train, cfg.data
    problems = []
    if p.backend != "megatron":
        problems.append(f"parallel.backend={p.backend}: this is the Megatron backend (use parallel=8xh100, "
                        "parallel=4x8 or parallel=1gpu, or scripts/run-fsdp.sh for the FSDP backend)")
    if p.cp > 1:
        problems.append(f"parallel.cp={p.cp}: context parallelism is not wired into the Megatron training entry "
                        "(batches are not split over cp ranks); set parallel.cp=1")
    if p.sequence_parallel and d.seq_length % p.tp:
        problems.append(f"data.seq_length={d.seq_length} must be a multiple of parallel.tp={p.tp} "
                        "with parallel.sequence_parallel=true")
    if p.dtype != "bf16" and p.device != "cpu":
        problems.append(f"parallel.dtype={p.dtype}: the Megatron backend trains in bf16 on GPUs")
    if t.log_every < 1:
        problems.append(f"train.log_every={t.log_every} must be >= 1")
    if t.save_every < 0 or t.eval_every < 0 or t.stop_after < 0:
        problems.append("train.save_every, train.eval_every and train.stop_after must be >= 0")
    if t.keep_checkpoints < 1:
        problems.append(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    return problems


def _wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def _wandb_on(cfg: RecipeConfig, installed: bool) -> bool:
    flag = str(cfg.logging.wandb.enabled).lower()
    if flag in ("false", "0", "no", "off"):
        return False
    if flag in ("true", "1", "yes", "on") and not installed:
        raise UserError("logging.wandb.enabled=true but wandb is not installed",
                        hint="pip install -e .[wandb], or logging.wandb.enabled=auto")
    return installed


def _model_flags(hf: Mapping[str, Any], cfg: RecipeConfig, use_te: bool) -> list[str]:
    out: list[str] = []
    for flag, value in model_args(hf):
        if flag == "--moe-grouped-gemm" and not use_te:
            continue  # TE-free experts are qnext's GroupedGemmExperts, built with moe_grouped_gemm=False
        if flag == "--moe-aux-loss-coeff" and cfg.train.router_aux_loss_coef is not None:
            value = repr(float(cfg.train.router_aux_loss_coef))
        out.append(flag)
        if value is not None:
            out.append(value)
    return out


def megatron_argv(
    cfg: RecipeConfig,
    hf: Mapping[str, Any],
    *,
    use_te: bool,
    ckpt: CheckpointPlan,
    wandb_installed: Optional[bool] = None,
) -> list[str]:
    """The megatron.training flags for this recipe (see the module docstring). The world size is
    not an input: megatron derives the data-parallel size from it (``validate_config`` has already
    checked the layout against it)."""
    if cfg.parallel.recompute == "auto":  # the entry resolves it with the GPU's memory; here 80 GiB GPUs
        from ..plan import resolve_recompute

        cfg = resolve_recompute(cfg, None, None)[0]
    t, p, d, lg = cfg.train, cfg.parallel, cfg.data, cfg.logging
    problems = check_megatron_recipe(cfg)
    if problems:
        raise UserError("invalid recipe for the Megatron backend:\n  - " + "\n  - ".join(problems))
    argv = _model_flags(hf, cfg, use_te)
    argv += ["--transformer-impl", "transformer_engine" if use_te else "local"]
    if not use_te:
        argv += TE_FREE_FLAGS
    # parallel layout
    argv += [
        "--tensor-model-parallel-size", str(p.tp),
        "--pipeline-model-parallel-size", str(p.pp),
        "--expert-model-parallel-size", str(p.ep),
        "--expert-tensor-parallel-size", str(p.etp),
        "--context-parallel-size", str(p.cp),
    ]
    if p.sequence_parallel:
        argv.append("--sequence-parallel")
    argv += RECOMPUTE[p.recompute]
    # batch and sequence: global = micro x data-parallel ranks x micro-batches per step
    argv += [
        "--micro-batch-size", str(t.micro_batch_size),
        "--global-batch-size", str(t.global_batch_size),
        "--seq-length", str(d.seq_length),
    ]
    # optimizer: AdamW (decoupled weight decay) sharded over data-parallel ranks
    argv += [
        "--optimizer", "adam",
        "--lr", repr(float(t.lr)),
        "--min-lr", repr(float(t.min_lr)),
        "--weight-decay", repr(float(t.weight_decay)),
        "--adam-beta1", repr(float(t.adam_beta1)),
        "--adam-beta2", repr(float(t.adam_beta2)),
        "--adam-eps", repr(float(t.adam_eps)),
        "--clip-grad", repr(float(t.grad_clip)),
        "--use-distributed-optimizer",
    ]
    if t.optimizer_cpu_offload:
        # megatron's hybrid CPU/GPU Adam goes through the precision-aware optimizer path
        argv += ["--optimizer-cpu-offload", "--use-precision-aware-optimizer", "--overlap-cpu-optimizer-d2h-h2d"]
    # schedule: linear warmup, then cosine to min_lr at the last step
    argv += [
        "--train-iters", str(t.steps),
        "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(t.warmup_steps),
        "--lr-decay-iters", str(t.steps),
    ]
    if p.dtype == "bf16":
        argv.append("--bf16")
    argv += ["--seed", str(t.seed)]
    # loss: summed over labelled tokens, divided by their count over the whole global batch. The
    # training loop stops on a non-finite loss itself and non-finite gradients stop the optimizer (below),
    # so megatron's result-validation reruns are off.
    argv += ["--calculate-per-token-loss", "--rerun-mode", "disabled"]
    if t.grad_clip > 0 and fixes_enabled():
        # the clipping norm is read on the host each step, and qnext.megatron.compat.grad_norm makes a NaN/Inf
        # norm fatal before the update: DDP's own check (two device reads per gradient bucket) adds nothing
        # (with QNEXT_MEGATRON_FIXES=0 that check is not installed, so DDP's stays)
        argv.append("--no-check-for-nan-in-loss-and-grad")
    # checkpoints: torch_dist; the converted release checkpoint lacks Transformer Engine's
    # _extra_state and any LoRA tensors, so a fresh start logs those instead of failing (qnext
    # checks every base weight itself before training); a resume must find every key.
    argv += ["--ckpt-format", "torch_dist", "--save", ckpt.save, "--load", ckpt.load]
    if ckpt.pretrained and not ckpt.resuming:
        argv += ["--pretrained-checkpoint", ckpt.pretrained]
    argv += ["--dist-ckpt-strictness", "raise_unexpected" if ckpt.resuming else "log_unexpected"]
    stop = t.stop_after if 0 < t.stop_after < t.steps else 0
    argv += ["--save-interval", str(t.save_every if t.save_every > 0 else (stop or t.steps))]
    if stop:
        argv += ["--exit-interval", str(stop)]
    # logging and evaluation
    argv += [
        "--log-interval", str(t.log_every),
        "--eval-interval", str(t.eval_every if t.eval_every > 0 else t.steps),
        "--eval-iters", str(t.eval_batches),
    ]
    if lg.tensorboard:
        argv += ["--tensorboard-dir", str(Path(cfg.output_dir).expanduser() / TENSORBOARD_SUBDIR)]
    if _wandb_on(cfg, _wandb_installed() if wandb_installed is None else wandb_installed):
        argv += [
            "--wandb-project", lg.wandb.project,
            "--wandb-exp-name", Path(cfg.output_dir).name,
            "--wandb-save-dir", str(Path(cfg.output_dir).expanduser() / "wandb"),
        ]
    # processes
    argv += ["--distributed-backend", "gloo" if p.device == "cpu" else "nccl", "--distributed-timeout-minutes", "30"]
    if p.device == "cpu":
        argv.append("--use-cpu-initialization")
    return argv


def parse_megatron_args(argv: Sequence[str], *, world_size: int, rank: int = 0, validate: bool = True) -> argparse.Namespace:
    """megatron.training's own parser and checks on ``argv`` (not sys.argv); unknown flags are errors.

    Does what ``megatron.training.arguments.parse_args`` + ``validate_args`` do, with the rank and
    world size given instead of read from the environment.
    """
    from megatron.training.arguments import add_megatron_arguments, validate_args

    parser = add_megatron_arguments(argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False))
    args = parser.parse_args(list(argv))
    args._is_global_batch_size_explicitly_specified = args.global_batch_size is not None
    args.rank, args.world_size = int(rank), int(world_size)
    if validate:
        try:
            validate_args(args, {})
        except AssertionError as err:
            raise UserError(f"megatron.training rejected the resolved arguments: {err}",
                            hint="python -m qnext.megatron.args ... prints them; the recipe keys map one to one") from None
    return args


def _main(argv: Optional[list[str]] = None) -> int:
    from ..config import load_config, validate_config
    from .spec import te_importable

    ap = argparse.ArgumentParser(prog="python -m qnext.megatron.args",
                                 description="print the megatron.training arguments of a recipe")
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "8")))
    ap.add_argument("--te", choices=["auto", "yes", "no"], default="auto", help="Transformer Engine layers")
    ap.add_argument("--check", action="store_true", help="also parse and validate with megatron.training")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.overrides)
    hf = validate_config(cfg, world_size=a.world_size)
    use_te = te_importable() if a.te == "auto" else a.te == "yes"
    out = megatron_argv(cfg, hf, use_te=use_te, ckpt=checkpoint_plan(cfg))
    if a.check:  # megatron's validation prints every argument: keep stdout for the list itself
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            parse_megatron_args(out, world_size=a.world_size)
    print(shlex.join(out))
    return 0


if __name__ == "__main__":
    import sys

    from ..errors import cli_main

    sys.exit(cli_main(_main)())

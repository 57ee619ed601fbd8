"""Checks that run before any process group exists; each failure names the option to change."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from .schema import RecipeConfig

REPO_ROOT = Path(__file__).resolve().parents[3]

CHOICES = {
    "train.mode": ("lora", "full"),
    "train.lora.base_dtype": ("bf16", "fp8", "nf4"),
    "parallel.backend": ("megatron", "fsdp"),
    "parallel.device": ("auto", "cuda", "cpu"),
    "parallel.dtype": ("bf16", "fp32"),
    "parallel.recompute": ("auto", "none", "experts_act", "experts", "selective", "full"),
    "data.format": ("chat_jsonl",),
    "data.overlong": ("truncate", "drop"),
    "resume_choices": (),
}


def resolve_path(path: str | None) -> Path | None:
    """Relative paths in recipes are relative to the current directory, else to the repo root."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def load_hf_config(cfg: RecipeConfig) -> dict[str, Any]:
    path = resolve_path(cfg.model.hf_config)
    if cfg.model.checkpoint and (resolve_path(cfg.model.checkpoint) / "config.json").exists():  # type: ignore[operator]
        path = resolve_path(cfg.model.checkpoint) / "config.json"  # type: ignore[operator]
    assert path is not None
    if not path.is_file():
        raise UserError(f"model config {path} not found (model.hf_config)", hint="point model.hf_config at a config.json")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})", hint="fix the file") from None
    if hf.get("model_type") != "qwen3_next":
        raise UserError(
            f"{path}: model_type is {hf.get('model_type')!r}, expected 'qwen3_next'",
            hint="this recipe repository supports Qwen3-Next checkpoints; pick a Qwen3-Next config",
        )
    return hf


def _get(cfg: RecipeConfig, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        cur = getattr(cur, part)
    return cur


def check_divisibility(hf: dict[str, Any], tp: int, ep: int, pp: int, etp: int = 1) -> list[str]:
    """Head/expert/layer divisibility by the parallel sizes (Megatron's constraints)."""
    problems = []
    for key, what in (
        ("num_attention_heads", "attention heads"),
        ("num_key_value_heads", "key/value heads (query groups)"),
        ("linear_num_key_heads", "Gated DeltaNet key heads"),
        ("linear_num_value_heads", "Gated DeltaNet value heads"),
    ):
        n = int(hf[key])
        if n % tp:
            ok = [d for d in range(1, n + 1) if n % d == 0]
            problems.append(
                f"parallel.tp={tp} does not divide the {n} {what} ({key}); choose parallel.tp from {ok}"
            )
    experts = int(hf.get("num_experts", 0))
    if experts and experts % ep:
        problems.append(f"parallel.ep={ep} does not divide the {experts} experts (num_experts); use a divisor of {experts}")
    moe_ffn = int(hf.get("moe_intermediate_size", 0))
    if moe_ffn and moe_ffn % etp:
        problems.append(f"parallel.etp={etp} does not divide moe_intermediate_size={moe_ffn}")
    layers = int(hf["num_hidden_layers"])
    if layers % pp:
        ok = [d for d in range(1, layers + 1) if layers % d == 0]
        problems.append(f"parallel.pp={pp} does not divide the {layers} layers (num_hidden_layers); choose from {ok}")
    return problems


def validate_config(cfg: RecipeConfig, world_size: int | None = None, check_files: bool = True) -> dict[str, Any]:
    """Raise one UserError listing every problem; return the model's HF config dict when all is well."""
    problems: list[str] = []
    for key, allowed in CHOICES.items():
        if not allowed:
            continue
        val = _get(cfg, key)
        if val not in allowed:
            problems.append(f"{key}={val!r} is not one of {', '.join(allowed)}")
    t, p, d = cfg.train, cfg.parallel, cfg.data
    for key, val, lo in (
        ("train.steps", t.steps, 1),
        ("train.global_batch_size", t.global_batch_size, 1),
        ("train.micro_batch_size", t.micro_batch_size, 1),
        ("train.lora.r", t.lora.r, 1),
        ("data.seq_length", d.seq_length, 8),
        ("parallel.tp", p.tp, 1),
        ("parallel.pp", p.pp, 1),
        ("parallel.ep", p.ep, 1),
        ("parallel.etp", p.etp, 1),
        ("parallel.cp", p.cp, 1),
    ):
        if val < lo:
            problems.append(f"{key}={val} must be >= {lo}")
    if not 0.0 <= d.valid_fraction < 1.0:
        problems.append(f"data.valid_fraction={d.valid_fraction} must be in [0, 1)")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        problems.append(f"train.lr={t.lr} / train.min_lr={t.min_lr}: need 0 <= min_lr <= lr and lr > 0")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        problems.append(f"train.warmup_steps={t.warmup_steps} must be between 0 and train.steps={t.steps}")
    if p.backend == "fsdp" and (p.tp, p.pp, p.ep, p.cp) != (1, 1, 1, 1):
        problems.append(
            "parallel.backend=fsdp shards only along data parallel: set parallel.tp/pp/ep/cp to 1 "
            "(or use parallel.backend=megatron)"
        )
    if p.backend == "fsdp" and p.recompute in ("experts_act", "experts"):
        problems.append(f"parallel.recompute={p.recompute} is the Megatron backend's (qnext's grouped experts); the "
                        "FSDP backend checkpoints whole layers: use parallel.recompute=full or none")
    if p.sequence_parallel and p.tp == 1:
        problems.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if t.lora.base_dtype != "bf16":
        if t.mode != "lora" or p.backend != "megatron":
            problems.append(f"train.lora.base_dtype={t.lora.base_dtype} quantizes the frozen experts of LoRA on the "
                            "Megatron backend: set train.mode=lora and parallel.backend=megatron, or base_dtype=bf16")
        if t.lora.experts:
            problems.append(f"train.lora.base_dtype={t.lora.base_dtype} needs train.lora.experts=false "
                            "(quantized experts are frozen)")
        if t.lora.base_dtype == "nf4":
            from ..quant.nf4 import available

            if not available():
                problems.append("train.lora.base_dtype=nf4 needs torchao (optional): pip install 'torchao==0.18.0' "
                                "(or pip install -e '.[quant]'), or use base_dtype=fp8, which needs nothing extra")

    hf: dict[str, Any] = {}
    try:
        hf = load_hf_config(cfg)
    except UserError as err:
        problems.append(err.message)
    if hf:
        problems += check_divisibility(hf, p.tp, p.ep, p.pp, p.etp)
    if world_size is not None and not problems:
        model_parallel = p.tp * p.pp * p.cp
        if world_size % model_parallel:
            problems.append(
                f"{world_size} processes are not a multiple of tp*pp*cp={model_parallel} (parallel.tp/pp/cp)"
            )
        else:
            dp = world_size // model_parallel
            if (world_size // p.pp) % (p.ep * p.etp):
                problems.append(
                    f"parallel.ep*etp={p.ep * p.etp} must divide the {world_size // p.pp} ranks of one pipeline stage"
                )
            if t.global_batch_size % (t.micro_batch_size * dp):
                problems.append(
                    f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                    f"train.micro_batch_size*data_parallel={t.micro_batch_size}*{dp}"
                )
    if check_files:
        for key, path in (("data.path", d.path), ("data.valid_path", d.valid_path), ("data.eval_prompts", d.eval_prompts)):
            rp = resolve_path(path)
            if rp is not None and not rp.is_file():
                problems.append(f"{key}: file {path} not found")
        for key, path in (("model.checkpoint", cfg.model.checkpoint), ("model.megatron_checkpoint", cfg.model.megatron_checkpoint), ("model.tokenizer", cfg.model.tokenizer)):
            rp = resolve_path(path)
            if rp is not None and not rp.is_dir():
                problems.append(f"{key}: directory {path} not found")
    if problems:
        if len(problems) == 1:
            raise UserError(f"invalid recipe: {problems[0]}")
        raise UserError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return hf

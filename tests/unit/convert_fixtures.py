"""A tiny HF Qwen3-Next checkpoint on disk for the conversion tests (hub layout: per-expert tensors,
sharded safetensors written by the safetensors library, index.json, config, tokenizer files)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "models/tiny_qwen3_next/config.json"


def small_config(**overrides) -> dict:
    """The tiny config with a small vocabulary (fast tests); overrides patch it."""
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg.update({"vocab_size": 512, **overrides})
    return cfg


def write_hf_checkpoint(out: Path, cfg: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        with_mtp: bool = True, max_shard_bytes: int = 300_000) -> Path:
    """Random weights for every tensor the weight map expects, sharded like the hub."""
    from qnext.models.qwen3_next import build_weight_map

    wm = build_weight_map(cfg, mtp_layers=1 if with_mtp else 0)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in wm.hf_shapes.items():
        t = torch.randn(shape, generator=g) * 0.5
        if name.endswith("linear_attn.norm.weight"):
            t = 1.0 + 0.1 * t  # plain RMSNorm weights sit near one
            t[0] = 3.0e-8  # and one value where w - 1 + 1 != w in float32: exercises the exact override
        tensors[name] = t.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": cfg["eos_token_id"]}))
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

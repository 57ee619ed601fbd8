"""Tiny HF Qwen3-Next checkpoints for the conversion tests: ``qnext.models.tiny`` (hub layout,
per-expert tensors, safetensors library, index.json, config, tokenizer) with a small vocabulary,
every norm, ``dt_bias`` and ``A_log`` moved off its initial value (``perturb``: otherwise a swapped
q_norm/k_norm rule or a ``1 - w`` norm shift gives the same logits), and one GDN output-norm value
where w - 1 + 1 != w, so the exact-restore path is exercised."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qnext.models.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "models/tiny_qwen3_next/config.json"
SMALL = {"vocab_size": 512}
ODD_NORM = "model.layers.0.linear_attn.norm.weight"


def small_config(**overrides) -> dict:
    """The tiny config with a small vocabulary (fast tests); overrides patch it."""
    return {**json.loads(TINY_CONFIG.read_text()), **SMALL, **overrides}


def write_hf_checkpoint(out: Path, overrides: dict | None = SMALL, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                        with_mtp: bool = True, max_shard_bytes: int = 300_000, odd_norm: bool = True,
                        perturb: bool = True) -> Path:
    out = write_tiny_checkpoint(out, seed=seed, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                overrides=overrides, with_mtp=with_mtp, perturb=perturb)
    if odd_norm:
        shard = out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][ODD_NORM]
        tensors = load_file(str(shard))
        w = tensors[ODD_NORM].clone()
        w[0] = 3.0e-8 if dtype == torch.float32 else 2.0**-20
        tensors[ODD_NORM] = w
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return out

"""Fill quantized (FP8 or NF4) routed experts from a bf16 torch_dist checkpoint, one MoE layer at a time.

A model built with ``qnext_expert_base="fp8"`` or ``"nf4"`` (``train.lora.base_dtype``) holds its routed
experts in quantized storage from the start (``qnext.megatron.experts``); megatron's own checkpoint load
skips them (their ``sharded_state_dict`` is empty). :func:`load_quantized_experts` then, for each such
module in turn, allocates that layer's experts in bf16, has ``dist_checkpointing.load`` fill them in the
layout the converter wrote (any TP/EP/ETP: torch_dist reshards), quantizes them into the module's storage
and frees the bf16 copy. So the GPU never holds more than one layer's bf16 experts: 3.2 GB for Qwen3-Next-80B-A3B
(512 x 3 x 2048 x 512 bf16 values), against 155 GB for all 48 layers.

The result is bit-identical to loading the bf16 model and quantizing it afterwards
(``tests/integration/test_quant_expert_load.py``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch


def quantized_expert_modules(model) -> list[tuple[str, torch.nn.Module]]:
    from .experts import GroupedGemmExperts

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, GroupedGemmExperts) and m.linear_fc1.quantized and m.linear_fc2.quantized]


def load_quantized_experts(model, ckpt_dir: str | Path, *, say: Optional[Callable[[str], None]] = None) -> int:
    """Load and quantize every quantized expert module of ``model`` (a megatron module, or the list
    megatron's ``get_model`` returns) from ``ckpt_dir``; returns how many modules were filled."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from ..errors import UserError
    from .model import _sharded_metadata, resolve_checkpoint_dir

    chunks = model if isinstance(model, (list, tuple)) else [model]
    path = str(resolve_checkpoint_dir(ckpt_dir))
    t0 = time.perf_counter()
    todo = [(chunk, name, m) for chunk in chunks for name, m in quantized_expert_modules(_unwrap(chunk))]
    for i, (chunk, name, module) in enumerate(todo):
        dtype = module.config.params_dtype  # the checkpoint's training dtype (bf16 for real runs)
        view = {n: torch.empty(tuple(getattr(module, n).shape), dtype=dtype, device=getattr(module, n).device)
                for n in ("linear_fc1", "linear_fc2")}
        module._load_view = view
        try:
            full = _unwrap(chunk).sharded_state_dict(metadata=_sharded_metadata())
        finally:
            module._load_view = None
        mine = {k: v for k, v in full.items() if getattr(v, "data", None) is not None
                and any(v.data is t for t in view.values())}
        if len(mine) != 2:
            raise RuntimeError(f"{name}: expected the 2 expert weights in the state dict, found {sorted(mine)}")
        del full
        loaded, _, absent = dist_checkpointing.load(mine, path, strict=StrictHandling.RETURN_ALL)
        if absent:
            raise UserError(f"{path}: the checkpoint lacks the routed experts of {name}, e.g. {sorted(absent)[:2]}",
                            hint="was it converted (make convert) from the model given by model.hf_config?")
        del view
        for key, w in loaded.items():
            if key in mine:
                sub = "linear_fc1" if key.endswith("linear_fc1.weight") else "linear_fc2"
                getattr(module, sub).set_quantized_(w)
        del loaded, mine
        if say is not None and (i + 1 == len(todo) or (i + 1) % 8 == 0):
            say(f"{module.base} experts: {i + 1}/{len(todo)} layers loaded and quantized "
                f"({time.perf_counter() - t0:.0f}s)")
    return len(todo)


def fill_quantized_experts(model, cfg, pretrained: Optional[str], say: Callable[[str], None]) -> int:
    """The training entry's step after megatron's load: with ``train.lora.base_dtype`` other than bf16,
    fill the frozen experts from the converted base checkpoint (run checkpoints do not hold them)."""
    from ..errors import UserError

    if cfg.train.mode != "lora" or cfg.train.lora.base_dtype == "bf16":
        return 0
    if not pretrained:
        raise UserError(f"train.lora.base_dtype={cfg.train.lora.base_dtype}: the frozen experts are read from the "
                        "converted base checkpoint (run checkpoints do not hold them)",
                        hint="pass model.megatron_checkpoint=<the OUT of make convert> when resuming too")
    n = load_quantized_experts(model, pretrained, say=say)
    say(f"{cfg.train.lora.base_dtype} experts: {n} MoE layer(s) on this rank quantized from {pretrained}")
    return n


def _unwrap(module):
    while hasattr(module, "module"):  # DDP / Float16Module wrappers
        module = module.module
    return module

"""Put LoRA on a Megatron Qwen3-Next model, freeze the rest; merge and unmerge.

``apply_lora`` walks this pipeline stage's decoder layers, asks the weight map which Megatron linear
each targeted HF linear became (``plan.py``) and attaches the branches (``layers.py``). Only the
adapters train afterwards. Load the base weights first (``qnext.megatron.model.load_torch_dist``):
a base checkpoint has no LoRA tensors; a checkpoint saved after ``apply_lora`` has both.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..config.schema import LoraConfig
from ..errors import UserError
from ..models.qwen3_next import Qwen3NextWeightMap, build_weight_map
from .layers import LoraLinear, attach, detach, parallel_kind
from .plan import layer_targets, peft_targets, plan_module

logger = logging.getLogger(__name__)


def model_chunks(model) -> list[nn.Module]:
    """The GPTModel(s) of this rank: a model, a list of virtual-pipeline chunks, or wrappers
    (DDP, Float16Module) around either."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    out = []
    for m in chunks:
        while not hasattr(m, "decoder") and hasattr(m, "module"):
            m = m.module
        out.append(m)
    return out


def decoder_layers(model) -> Iterator[tuple[int, nn.Module]]:
    """(0-based global layer index, TransformerLayer) of this rank's decoder layers (MTP excluded:
    transformers' model has no MTP modules for PEFT to adapt)."""
    for chunk in model_chunks(model):
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            yield layer.layer_number - 1, layer


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _tp_rank_size(module: nn.Module) -> tuple[int, int]:
    if not torch.distributed.is_initialized():
        return 0, 1
    from .layers import tp_group_of

    group = tp_group_of(module)
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def weight_map_of(hf_config: Any) -> Qwen3NextWeightMap:
    """The weight map for an HF config (dict, config.json path or checkpoint directory); built once
    per config (a virtual-pipeline run calls ``apply_lora`` once per model chunk)."""
    from ..megatron.config import load_hf_config

    if isinstance(hf_config, Qwen3NextWeightMap):
        return hf_config
    cfg = load_hf_config(hf_config if isinstance(hf_config, Mapping) else Path(hf_config))
    return _weight_map(json.dumps(cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _weight_map(cfg_json: str) -> Qwen3NextWeightMap:
    return build_weight_map(json.loads(cfg_json))


def apply_lora(model, cfg: LoraConfig, *, hf_config: Any, seed: int = 0, freeze: bool = True):
    """Attach LoRA branches to the linears ``cfg.targets`` names (HF names, PEFT's matching rule) in
    this rank's decoder layers; with ``freeze`` only the adapters keep ``requires_grad``. Returns
    ``model`` (``lora_modules(model)`` lists what was adapted).

    ``hf_config``: the model's HF config (dict, config.json or checkpoint directory), for the
    weight map. Every branch's A is PEFT's initialisation drawn from a generator seeded by
    (``seed``, HF module name) over the whole HF shape, then sharded: every rank and every TP layout
    starts from the same adapter without a broadcast. B starts at zero.
    """
    wm = weight_map_of(hf_config)
    targets = peft_targets(cfg)
    if cfg.r <= 0:
        raise UserError(f"train.lora.r must be positive, got {cfg.r}", hint="e.g. train.lora.r=16")
    done = []
    for layer_idx, layer in decoder_layers(model):
        for module_name, hf_weights in layer_targets(wm, layer_idx, targets).items():
            module = layer.get_submodule(module_name)
            kind = parallel_kind(module)
            if kind is None:
                raise UserError(f"layer {layer_idx} {module_name} ({type(module).__name__}) is not a "
                                "tensor-parallel linear LoRA can adapt",
                                hint=f"drop its HF names from train.lora.targets ({hf_weights})")
            tp_rank, tp_size = _tp_rank_size(module)
            plan = plan_module(wm, layer_idx, module_name, hf_weights, kind, tp_size, tp_rank)
            attach(module, plan, cfg.r, cfg.alpha, cfg.dropout, generator_for=lambda name: _generator(seed, name))
            done.append(f"decoder.layers.{layer_idx}.{module_name}")
    if not done:
        raise UserError(f"LoRA targets {targets} matched no linear layer on this rank",
                        hint="check train.lora.targets against the model's layer types")
    for m in lora_modules(model).values():
        m.lora_config = cfg  # read back by the exporter and the adapter loader
    if freeze:
        for chunk in model_chunks(model):
            for p in chunk.parameters():
                p.requires_grad_(False)
        for p in lora_parameters(model):
            p.requires_grad_(True)
    logger.info("LoRA r=%d alpha=%g on %d linears of this rank (targets %s)", cfg.r, cfg.alpha, len(done), targets)
    return model


def lora_modules(model) -> dict[str, LoraLinear]:
    """{module name: LoRA-carrying linear} for this rank (names relative to each model chunk)."""
    out = {}
    for chunk in model_chunks(model):
        for name, m in chunk.named_modules():
            if isinstance(m, LoraLinear):
                out[name] = m
    return out


def lora_config_of(model) -> LoraConfig:
    """The LoraConfig ``apply_lora`` was called with."""
    for m in lora_modules(model).values():
        if getattr(m, "lora_config", None) is not None:
            return m.lora_config
    raise ValueError("the model has no LoRA branches (call apply_lora first)")


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in m.lora.parameters()]


def merge_lora(model) -> int:
    """Fold every adapter into its base weight shard (no communication: each rank owns its part of
    s * B A). Returns how many linears were merged."""
    mods = lora_modules(model)
    for m in mods.values():
        m.merge_lora()
    return len(mods)


def unmerge_lora(model) -> int:
    mods = lora_modules(model)
    for m in mods.values():
        m.unmerge_lora()
    return len(mods)


def remove_lora(model) -> int:
    """Unmerge and remove every adapter; the model is the base model again."""
    mods = lora_modules(model)
    for m in mods.values():
        detach(m)
    return len(mods)

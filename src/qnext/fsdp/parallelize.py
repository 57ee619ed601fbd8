"""Transformations that turn a plain HF Qwen3-Next model into the trained, sharded one.

Each function does one thing and is applied in this order by ``train.py``:
``apply_lora`` (or ``set_full_training``) -> ``apply_ac`` -> ``apply_fsdp``. The model definition
itself stays transformers' own.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.nn as nn

from ..config.schema import LoraConfig

# transformers 5 keeps routed experts fused in memory as 3-D parameters of ``mlp.experts``.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
SHARED_EXPERT_MODULES = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM, a PEFT model around one, or our loss wrapper."""
    for name, mod in model.named_modules():
        if name.endswith("model.layers") and isinstance(mod, nn.ModuleList):
            return mod
    raise ValueError("no decoder layers (…model.layers) found in the model")


def lora_peft_config(cfg: LoraConfig):
    """PEFT LoraConfig from the recipe: targets by last name component; experts as parameters."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(cfg.targets)
    if cfg.shared_expert:
        targets += [t for t in SHARED_EXPERT_MODULES if t not in targets]
    kwargs = {}
    if cfg.experts:
        kwargs["target_parameters"] = list(EXPERT_PARAMETERS)
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        **kwargs,
    )


def apply_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """Wrap in a PEFT LoRA model; only the adapters train.

    The adapters' random init (lora_A) is drawn from a generator seeded by ``seed`` so every rank
    starts from the same weights without a broadcast. A target name matching nothing is an error
    (PEFT's own message names it).
    """
    from peft import get_peft_model

    from ..errors import UserError

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, lora_peft_config(cfg))
    except ValueError as err:
        raise UserError(f"LoRA targets: {err}", hint="fix train.lora.targets (module names of the HF model)") from None
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def set_full_training(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains (float32 master weights are the caller's dtype choice)."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_ac(model: nn.Module) -> None:
    """Activation checkpointing per decoder layer (non-reentrant), through transformers' own
    ``GradientCheckpointingLayer`` so parameter names do not change.

    fla's kernels carry an inner ``@checkpoint`` of their own in some places; recomputing inside a
    recompute only costs time, and the reentrant form has hung real runs, so the inner one is
    switched off (our fla patch reads ``QNEXT_FLA_INNER_CHECKPOINT``).
    """
    os.environ["QNEXT_FLA_INNER_CHECKPOINT"] = "0"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def mixed_precision_policy(dtype: str):
    """bf16: parameters all-gathered and computed in bf16, gradients reduced in float32.
    fp32: no policy (exact float32 everywhere, what the CPU tests compare)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def needs_fsdp(world_size: int, device_type: str, storage_dtype: torch.dtype, compute: str) -> bool:
    """Whether to wrap the model in FSDP2: with several ranks (sharding), or on one GPU when the stored
    weights are not in the compute dtype (FSDP's mixed-precision policy casts them per layer: full
    training's float32 master weights computed in bf16). One GPU with the weights already in the compute
    dtype (LoRA on a bf16 base) has nothing to shard or cast: FSDP would only copy every layer's
    parameters at each all-gather (30.6 ms of device copies in the 4-layer proxy's LoRA step on an H200,
    2026-12-04). One CPU process is never wrapped."""
    if world_size > 1:
        return True
    wanted = torch.bfloat16 if compute == "bf16" else torch.float32
    return device_type == "cuda" and storage_dtype != wanted


def apply_fsdp(root: nn.Module, layers: Iterable[nn.Module], mesh, dtype: str, reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` each decoder layer (one all-gather per layer, freed after use), then the
    root, which holds what is left (embeddings, final norm, LM head).

    Gradients are averaged over ranks by FSDP; the loss is pre-scaled by the caller so that the
    result is the global token-mean (see ``train.py``).
    """
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again right after the forward (LM head in backward): keep them
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) element counts (global sizes, also for sharded DTensors)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total

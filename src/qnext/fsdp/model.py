"""The training module: an HF causal LM (optionally inside PEFT) plus its loss, as one ``nn.Module``.

Why a wrapper: the loss needs the LM head only where a label exists (assistant tokens), not on every
position; with a 152k vocabulary that is most of the compute and memory of a small model on CPU.
Being one module, it is also the FSDP root (embeddings, final norm, LM head are sharded there).

``forward`` returns the *sum* of token cross-entropies, the number of labelled tokens, and the router
auxiliary loss (0 when off); the trainer divides by the global token count.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The HF ``…ForCausalLM`` inside a PEFT model (LoRA layers injected in place), or the model itself."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def router_aux_coef(hf_config: Any, override: float | None) -> float:
    """``train.router_aux_loss_coef`` when set, else the model config's coefficient if the config asks
    for router logits (``output_router_logits``), else 0 (transformers' own rule)."""
    if override is not None:
        return float(override)
    if getattr(hf_config, "output_router_logits", False) and getattr(hf_config, "num_experts", 0):
        return float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0)
    return 0.0


class CausalLMLoss(nn.Module):
    def __init__(self, model: nn.Module, aux_loss_coef: float = 0.0):
        super().__init__()
        self.model = model  # registered as a child: state-dict keys are "model.<PEFT or HF name>"
        self.aux_loss_coef = aux_loss_coef

    @property
    def lm(self) -> nn.Module:
        return causal_lm_of(self.model)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        generation_config: Any = None,
        **extra: Any,
    ) -> Any:
        lm = self.lm
        if generation_config is not None:
            # Generation runs inside the root forward so FSDP gathers the root's parameters (embeddings,
            # LM head) once, and each layer's as it is called; every rank must generate in lockstep.
            return lm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
        want_aux = self.aux_loss_coef > 0
        out = lm.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_router_logits=want_aux,
            **extra,
        )
        hidden = out.last_hidden_state
        # position t predicts token t+1 (labels are not shifted by the data pipeline)
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        if position_ids is not None:  # packed rows: a chat's last token does not predict the next chat's first
            keep = keep & (position_ids[:, 1:] != 0)
        picked = hidden[:, :-1][keep]
        logits = lm.lm_head(picked).float()
        ce_sum = F.cross_entropy(logits, target[keep], reduction="sum")
        n_tokens = keep.sum()
        aux = hidden.new_zeros((), dtype=torch.float32)
        if want_aux and out.router_logits is not None:
            from transformers.models.qwen3_next.modeling_qwen3_next import load_balancing_loss_func

            cfg = lm.config
            aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, attention_mask)
            aux = torch.as_tensor(aux, dtype=torch.float32, device=hidden.device)
        return ce_sum, n_tokens, aux


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """Model inputs from a collated batch. An all-ones attention mask is dropped (plain causal
    attention is faster and identical); a packed batch (``cu_seqlens``) passes its boundaries on."""
    out: dict[str, Any] = {
        "input_ids": batch["input_ids"].to(device),
        "labels": batch["labels"].to(device),
    }
    if "position_ids" in batch and batch["position_ids"] is not None:
        out["position_ids"] = batch["position_ids"].to(device)
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        out["attention_mask"] = mask.to(device)
    cu = batch.get("cu_seqlens")
    if cu is not None:
        cu = cu.to(device=device, dtype=torch.int32)
        maxlen = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=maxlen, max_length_k=maxlen)
    return out

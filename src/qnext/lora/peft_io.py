"""Megatron LoRA <-> an HF PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

The adapter is what ``PeftModel.from_pretrained`` loads onto transformers' Qwen3-Next: one A and B per
HF linear, keyed ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` etc. Each
branch already lives in HF layout (``plan.py``): export only gathers TP chunks (B rows of a
column-parallel linear, A columns of a row-parallel one) and the pipeline stages; loading takes this
rank's chunk of each tensor.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..config.schema import LoraConfig
from ..errors import UserError
from ..peft_format import ADAPTER_WEIGHTS, read_adapter
from ..fsutil import atomic_dir
from .apply import decoder_layers, lora_config_of, lora_modules
from .plan import COLUMN, HF_LAYER, linear_modules, peft_targets, shared_expert_targets, target_matches

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def peft_key(hf_module: str, factor: str) -> str:
    """PEFT's saved name of a LoRA factor (``factor``: ``A`` or ``B``)."""
    return f"{PEFT_PREFIX}{hf_module}.lora_{factor}.weight"


def _all_gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def hf_lora_tensors(model, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's adapters as whole HF-layout tensors under PEFT's names, on the CPU (``grads``:
    their gradients instead, taken as they are, i.e. after megatron's grad finalisation).

    Collective over each adapted linear's TP group (every TP rank of a stage must call it).
    """
    out = {}
    for module in lora_modules(model).values():
        plan = module.lora_plan
        for br in module.lora.values():
            a, b = (br.lora_A.grad, br.lora_B.grad) if grads else (br.lora_A, br.lora_B)
            if a is None or b is None:
                raise ValueError(f"{br.plan.hf_module}: no gradient (run a backward pass first)")
            a, b = a.detach(), b.detach()
            if plan.tp_size > 1:
                if plan.kind == COLUMN:
                    b = _all_gather(b, 0, module.lora_tp_group)
                else:
                    a = _all_gather(a, 1, module.lora_tp_group)
            out[peft_key(br.plan.hf_module, "A")] = a.cpu().contiguous()
            out[peft_key(br.plan.hf_module, "B")] = b.cpu().contiguous()
    return out


def _gather_to_rank0(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """Every pipeline stage's tensors on global rank 0 (one TP/DP replica contributes per stage)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return tensors
    from megatron.core import parallel_state as ps

    contributes = (ps.get_tensor_model_parallel_rank() == 0
                   and ps.get_data_parallel_rank(with_context_parallel=True) == 0)
    rank = torch.distributed.get_rank()
    parts = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object(tensors if contributes else {}, parts, dst=0)
    if rank != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for p in parts:
        merged.update(p)
    return merged


def peft_config(cfg: LoraConfig, hf_modules: list[str], base_model: Optional[str] = None):
    """PEFT's LoraConfig for the adapter: ``target_modules`` = the recipe's targets that matched."""
    from peft import LoraConfig as PeftLoraConfig

    targets = [t for t in peft_targets(cfg) if any(target_matches(m, t) for m in hf_modules)]
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
        inference_mode=True,
    )


def export_peft_adapter(
    model,
    out_dir: str | os.PathLike,
    *,
    base_model: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
) -> Optional[Path]:
    """Write the model's adapters as a PEFT adapter directory (atomically, on global rank 0).

    Collective: every rank calls it. ``base_model`` goes into ``base_model_name_or_path``.
    Returns the directory on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    cfg = lora_config_of(model)
    tensors = _gather_to_rank0(hf_lora_tensors(model))
    path = None
    if tensors is not None:
        modules = sorted({k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
        config = peft_config(cfg, modules, str(Path(base_model).resolve()) if base_model else None)
        if any(".shared_expert." in m for m in modules):
            logger.warning(
                "the adapter has shared-expert LoRA (shared_expert.gate_proj/up_proj/down_proj). PEFT 0.21 on "
                "transformers 5 re-targets every name ending in gate_proj/up_proj/down_proj to Qwen3-Next's fused "
                "routed experts, so PeftModel.from_pretrained does not apply these tensors to the shared expert; "
                "qnext.export's merge and loaders that read the names as written do.")
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            config.save_pretrained(str(tmp))
            save_file(dict(sorted(tensors.items())), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        path = Path(out_dir)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return path


_CKPT_LORA_KEY = re.compile(r"^decoder\.layers\.(?P<i>\d+)\.(?P<module>.+)\.lora\.(?P<branch>[^.]+)\.lora_(?P<f>[AB])$")


def checkpoint_lora_tensors(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a torch_dist checkpoint (any TP layout: they are stored in HF layout)
    under PEFT's names, read on the CPU without building a model."""
    from ..convert.dcp_io import DcpReader
    from ..convert.megatron_dir import resolve_iteration_dir

    reader = DcpReader(resolve_iteration_dir(ckpt_dir))
    hf_of = {(mg, hf.rsplit(".", 1)[-1]): hf for hf, mg in linear_modules().items()}
    out = {}
    try:
        for key in sorted(reader.tensors()):
            m = _CKPT_LORA_KEY.match(key)
            if m is None:
                continue
            hf_rel = hf_of.get((m["module"], m["branch"]))
            if hf_rel is None:
                raise UserError(f"{ckpt_dir}: LoRA tensor {key} belongs to no HF linear of the weight map",
                                hint="was it saved by qnext.lora for Qwen3-Next?")
            out[peft_key(f"{HF_LAYER.format(i=m['i'])}.{hf_rel}", m["f"])] = reader.read(key).clone()
    finally:
        reader.close()
    return out


def export_adapter_from_checkpoint(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    lora: LoraConfig,
    *,
    base_model: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
) -> Path:
    """A PEFT adapter directory from the LoRA tensors of a torch_dist checkpoint saved after
    ``apply_lora`` (``lora``: the run's LoRA config, for alpha and dropout; r is checked)."""
    from safetensors.torch import save_file

    tensors = checkpoint_lora_tensors(ckpt_dir)
    if not tensors:
        raise UserError(f"{ckpt_dir} holds no LoRA tensors", hint="export a checkpoint of a train.mode=lora run")
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    if ranks != {lora.r}:
        raise UserError(f"{ckpt_dir}: LoRA rank {sorted(ranks)} in the checkpoint, {lora.r} in the config",
                        hint="pass the run's train.lora settings")
    modules = sorted({k[len(PEFT_PREFIX):-len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")})
    config = peft_config(lora, modules, str(Path(base_model).resolve()) if base_model else None)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(out_dir)


def lora_config_from_adapter(adapter_cfg: Mapping[str, Any]) -> LoraConfig:
    """The recipe LoraConfig equivalent to a PEFT adapter_config.json (for ``apply_lora`` before
    :func:`load_peft_adapter`)."""
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"adapter type {adapter_cfg.get('peft_type')} is not LoRA", hint="load a LoRA adapter")
    for key in ("use_rslora", "use_dora", "target_parameters", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        if adapter_cfg.get(key):
            raise UserError(f"adapter_config.json sets {key}, which the Megatron LoRA does not implement",
                            hint="train the adapter without it")
    targets = adapter_cfg.get("target_modules")
    if not isinstance(targets, (list, tuple)):
        raise UserError(f"adapter_config.json target_modules is {targets!r}, not a list of names",
                        hint="export the adapter with a list of module names")
    shared = shared_expert_targets()
    has_shared = all(t in targets for t in shared)
    return LoraConfig(
        r=int(adapter_cfg["r"]),
        alpha=float(adapter_cfg["lora_alpha"]),
        dropout=float(adapter_cfg.get("lora_dropout") or 0.0),
        targets=[t for t in targets if not (has_shared and t in shared)],
        shared_expert=has_shared,
    )


@torch.no_grad()
def load_peft_adapter(model, adapter_dir: str | os.PathLike, *, strict: bool = True) -> int:
    """Copy a PEFT adapter's tensors into the model's LoRA branches (this rank's chunks).

    The model must carry matching branches (``apply_lora`` with ``lora_config_from_adapter``);
    r and alpha must agree. ``strict``: every branch of this rank must be in the adapter, and every
    adapter tensor of this rank's layers must have a branch. Returns the number of tensors copied.
    """
    adapter_cfg, weights = read_adapter(adapter_dir)
    cfg = lora_config_of(model)
    want = lora_config_from_adapter(adapter_cfg)
    if (want.r, want.alpha) != (cfg.r, cfg.alpha):
        raise UserError(f"{adapter_dir}: adapter r={want.r} alpha={want.alpha}, model LoRA r={cfg.r} alpha={cfg.alpha}",
                        hint="apply_lora with lora_config_from_adapter(adapter_config) first")
    todo, missing = [], []
    for module in lora_modules(model).values():
        for br in module.lora.values():
            ka, kb = peft_key(br.plan.hf_module, "A"), peft_key(br.plan.hf_module, "B")
            if ka in weights and kb in weights:
                todo.append((module, br, ka, kb))
            else:
                missing.append(br.plan.hf_module)
    used = {k for _, _, ka, kb in todo for k in (ka, kb)}
    prefixes = tuple(f"{PEFT_PREFIX}model.layers.{i}." for i, _ in decoder_layers(model))
    unused = sorted(k for k in weights if k.startswith(prefixes) and k not in used)
    if strict and (missing or unused):  # checked before anything is copied
        raise UserError(f"{adapter_dir}: adapter and model LoRA differ: missing {missing[:3]}, "
                        f"without a branch {unused[:3]}",
                        hint="apply_lora with lora_config_from_adapter(adapter_config) so the targets agree")
    for module, br, ka, kb in todo:
        a, b = module.lora_plan.shard(br.plan, weights[ka], weights[kb])
        br.lora_A.copy_(a)
        br.lora_B.copy_(b)
    return len(used)

"""The model provider megatron.training's ``get_model`` calls on every rank: the Qwen3-Next model
(``qnext.megatron.model.build_model``), its base weights checked against the converted checkpoint, and
for ``train.mode=lora`` the adapters attached before megatron wraps it in DDP and builds the optimizer."""
from __future__ import annotations

from typing import Any, Optional

from ..config import RecipeConfig
from ..errors import UserError
from .prepare import Prepared


def attach_lora(model, cfg: RecipeConfig, hf: dict[str, Any]):
    """The LoRA hook: adapters go on right after the model is built, before megatron wraps it in DDP
    and builds the optimizer, so that the optimizer sees the adapters as the only trainable weights.

    The implementation lives in ``qnext.lora``: ``apply_lora(model, lora_cfg, *, hf_config, seed)``
    must freeze the base weights, attach the adapters to the parallel linears and return the model.
    """
    try:
        from ..lora import apply_lora  # imported here: qnext.lora is optional until train.mode=lora
    except ImportError as err:
        raise UserError(
            f"train.mode=lora needs qnext.lora.apply_lora(model, lora_cfg, hf_config=..., seed=...) for Megatron "
            f"models, which this checkout does not provide ({err})",
            hint="use train.mode=full, or update to a checkout with LoRA for the Megatron backend",
        ) from None
    model = apply_lora(model, cfg.train.lora, hf_config=hf, seed=cfg.train.seed)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("LoRA left no trainable parameter on this rank", hint="check train.lora.targets")
    return model


def training_overrides(args) -> dict[str, Any]:
    """TransformerConfig fields that come from the training arguments rather than the HF config."""
    out = dict(
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        calculate_per_token_loss=args.calculate_per_token_loss,
        deallocate_pipeline_outputs=True,
        use_cpu_initialization=bool(args.use_cpu_initialization),
        barrier_with_L1_time=args.barrier_with_L1_time,
    )
    if args.recompute_modules is not None:
        out["recompute_modules"] = list(args.recompute_modules)
    coeff = args.moe_aux_loss_coeff
    if coeff is not None:
        out["moe_aux_loss_coeff"] = float(coeff[0]) if isinstance(coeff, (list, tuple)) and len(coeff) == 1 else coeff
    return out


def model_provider(prep: Prepared, args, check_base_against: Optional[set[str]]):
    """The function megatron.training's ``get_model`` calls on every rank (once per model chunk)."""
    import torch

    from .checkpoint import missing_base_keys, model_tensor_keys
    from .compat import grad_accum
    from .model import build_model

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    overrides = training_overrides(args)
    if prep.cfg.train.mode == "lora" and prep.cfg.train.lora.base_dtype != "bf16":
        if prep.use_te:
            raise UserError(f"train.lora.base_dtype={prep.cfg.train.lora.base_dtype} needs the TE-free expert layers "
                            "(qnext's grouped GEMM experts), which are used only where Transformer Engine is not installed",
                            hint="run where transformer-engine is not installed, or set train.lora.base_dtype=bf16")
        overrides["qnext_expert_base"] = prep.cfg.train.lora.base_dtype  # FP8 storage, filled by quant_load
    level = prep.cfg.parallel.recompute
    if level in ("experts_act", "experts"):  # no megatron flag: qnext's grouped experts do it
        if prep.use_te:
            raise UserError(f"parallel.recompute={level} is implemented by qnext's TE-free expert layers",
                            hint="use parallel.recompute=selective with Transformer Engine")
        overrides[f"qnext_recompute_{level}"] = True
    if not prep.use_te and grad_accum.enabled():  # wgrad GEMMs write into the fp32 main_grad (compat.grad_accum)
        overrides["gradient_accumulation_fusion"] = grad_accum.install_grad_accum_fusion()

    def provide(pre_process: bool = True, post_process: bool = True, vp_stage=None, config=None, pg_collection=None):
        model = build_model(prep.hf, prep.cfg.parallel, dtype, prep.use_te, pre_process=pre_process,
                            post_process=post_process, vp_stage=vp_stage, pg_collection=pg_collection,
                            config_overrides=overrides)
        base_keys = None
        if check_base_against is not None:
            base_keys = model_tensor_keys(model)
            missing = missing_base_keys(model, check_base_against, base_keys)
            if missing:
                raise UserError(
                    f"model.megatron_checkpoint={prep.cfg.model.megatron_checkpoint} lacks {len(missing)} weight(s) "
                    f"this model needs, e.g. {missing[:4]}",
                    hint="was it converted (make convert) from the model given by model.hf_config?")
        if prep.cfg.train.mode == "lora":
            model = attach_lora(model, prep.cfg, prep.hf)
            if base_keys is not None:
                # megatron's load tolerates absent keys (the adapters): base weights must keep their keys
                renamed = sorted(base_keys - model_tensor_keys(model))
                if renamed:
                    raise RuntimeError(f"LoRA changed the checkpoint keys of base weights, e.g. {renamed[:4]}")
        return model

    return provide



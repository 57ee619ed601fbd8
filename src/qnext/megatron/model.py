"""Build the Megatron Qwen3-Next ``GPTModel`` and load torch_dist checkpoints into it.

``build_model`` is the model provider: it maps the HF config (``config.py``), picks the back end
(``spec.py``: TE when it imports, TE-free otherwise; logged) and builds this pipeline stage's
``GPTModel``. ``model_provider`` wraps it in the signature ``megatron.training.get_model`` calls.
Model-parallel state must exist first (``qnext.megatron.parallel.initialize_parallel`` or
megatron.training's own initialisation).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError
from .config import HFConfig, MegatronModelArgs, ParallelSizes, hf_to_transformer_config
from .spec import TE, block_spec, select_backend
from .gemm_layout import dense_linear_inputs

logger = logging.getLogger(__name__)

EXTRA_STATE_SUFFIX = "_extra_state"


def _check_parallel_state(p: ParallelSizes) -> None:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError(
            "megatron model-parallel state is not initialised: call "
            "qnext.megatron.parallel.initialize_parallel(...) (or megatron.training's initialize) first"
        )
    have = dict(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
    )
    want = dict(tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, cp=p.cp)
    if have != want:
        raise RuntimeError(f"parallel sizes {want} differ from the initialised process groups {have}")


def megatron_args(
    hf_config: HFConfig | str | Path,
    parallel: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    use_te: Optional[bool] = None,
    **config_overrides: Any,
) -> tuple[str, MegatronModelArgs]:
    """(back end, TransformerConfig + GPTModel arguments) without building anything."""
    backend = select_backend(use_te)
    args = hf_to_transformer_config(hf_config, parallel, dtype, use_te=backend == TE, **config_overrides)
    return backend, args


def build_model(
    hf_config: HFConfig | str | Path,
    parallel: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    use_te: Optional[bool] = None,
    *,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    config_overrides: Optional[dict[str, Any]] = None,
):
    """This rank's pipeline stage of Qwen3-Next as a megatron-core ``GPTModel``.

    ``parallel``: ``ParallelSizes``, the recipe's ``ParallelConfig`` or a dict (tp, pp, ep, etp, cp,
    sequence_parallel); it must match the initialised process groups. ``use_te``: None = TE when
    importable, True = require TE, False = TE-free. The chosen back end is logged and stored on the
    model as ``model.qnext_backend``.
    """
    from megatron.core import parallel_state as ps
    from .lm_loss import QnextGPTModel

    p = ParallelSizes.of(parallel)
    _check_parallel_state(p)
    backend, args = megatron_args(hf_config, p, dtype, use_te, **(config_overrides or {}))
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    spec = block_spec(args.config, backend, vp_stage=vp_stage, pp_rank=ps.get_pipeline_model_parallel_rank())
    extra = {} if pg_collection is None else {"pg_collection": pg_collection}
    model = QnextGPTModel(
        config=args.config,
        transformer_layer_spec=spec,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **args.gpt_kwargs(),
        **extra,
    )
    if torch.cuda.is_available() and not args.config.use_cpu_initialization:
        # Some parameters (the shared-expert gate) are created on the CPU and moved with the model,
        # as megatron.training's get_model does right after calling the provider.
        model.cuda(torch.cuda.current_device())
    model.qnext_backend = backend
    dense_linear_inputs(model)  # one GEMM per linear for [s, 1, h] activations (qnext.megatron.gemm_layout)
    logger.info(
        "built Qwen3-Next GPTModel (%s back end, pp rank %d: %d layers, %.1fM params on this rank)",
        backend,
        ps.get_pipeline_model_parallel_rank(),
        len(model.decoder.layers),
        sum(t.numel() for t in model.parameters()) / 1e6,
    )
    return model


def model_provider(
    hf_config: HFConfig | str | Path,
    parallel: Any = None,
    dtype: torch.dtype = torch.bfloat16,
    use_te: Optional[bool] = None,
    config_overrides: Optional[dict[str, Any]] = None,
):
    """A ``model_provider_func`` for ``megatron.training`` (pre_process, post_process, vp_stage, ...)."""

    def provide(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None, config=None,
                pg_collection=None):
        return build_model(
            hf_config, parallel, dtype, use_te, pre_process=pre_process, post_process=post_process,
            vp_stage=vp_stage, pg_collection=pg_collection, config_overrides=config_overrides,
        )

    return provide


# ---------------------------------------------------------------------------------------------- loading
def resolve_checkpoint_dir(ckpt_dir: str | Path) -> Path:
    """A torch_dist directory (has ``.metadata``), or a Megatron save root with
    ``latest_checkpointed_iteration.txt`` (-> ``iter_XXXXXXX`` or ``release``)."""
    root = Path(ckpt_dir)
    if (root / ".metadata").is_file():
        return root
    tracker = root / "latest_checkpointed_iteration.txt"
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = root / ("release" if text == "release" else f"iter_{int(text):07d}")
        if (sub / ".metadata").is_file():
            return sub
        raise UserError(f"{tracker} points at {sub}, which holds no torch_dist checkpoint (.metadata)")
    raise UserError(
        f"{root} is not a torch_dist checkpoint (no .metadata, no latest_checkpointed_iteration.txt)",
        hint="pass the directory written by tools/convert_hf_to_torch_dist.py or by Megatron's save",
    )


def _sharded_metadata() -> dict:
    """What megatron.training passes to ``sharded_state_dict`` (checkpointing._build_sharded_state_dict_metadata)."""
    from megatron.core import parallel_state as ps

    return {
        "singleton_local_shards": False,
        "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True),
    }


def load_torch_dist(model, ckpt_dir: str | Path, *, allow_unused: bool = True) -> dict[str, list[str]]:
    """Load a torch_dist checkpoint into ``model`` (any TP/EP/ETP/PP layout: torch_dist reshards).

    Keys this model asks for but the checkpoint lacks are an error, except Transformer Engine's
    ``_extra_state`` objects (a TE-free or converted checkpoint has none; TE then keeps its defaults).
    Checkpoint keys this model does not use (e.g. ``mtp.*`` carried by the converter) are allowed
    when ``allow_unused`` and returned. Returns {"not_in_checkpoint": [...], "unused": [...]}.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = resolve_checkpoint_dir(ckpt_dir)
    sharded = model.sharded_state_dict(metadata=_sharded_metadata())
    wanted = set(sharded)
    state_dict, unused, absent = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RETURN_ALL)
    absent = sorted(absent)
    unused = sorted(unused)
    bad = [k for k in absent if not k.endswith(EXTRA_STATE_SUFFIX)]
    if bad:
        raise UserError(
            f"{path}: the checkpoint lacks {len(bad)} tensor(s) the model needs, e.g. {bad[:5]}",
            hint="was it converted from a checkpoint with the same config.json (layers, experts, widths)?",
        )
    if unused and not allow_unused:
        raise UserError(f"{path}: {len(unused)} checkpoint tensor(s) are not used by the model, e.g. {unused[:5]}")
    if unused:
        logger.info("checkpoint tensors not used by this model: %d (e.g. %s)", len(unused), unused[:3])
    # The result also holds the checkpoint's common objects (megatron.training's args, iteration...).
    weights = {k: v for k, v in state_dict.items() if k in wanted}
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(EXTRA_STATE_SUFFIX)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict mismatch after load: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return {"not_in_checkpoint": absent, "unused": unused}


def save_torch_dist(model, ckpt_dir: str | Path) -> Path:
    """megatron-core's own torch_dist save of the model weights (needs CUDA; see FINDINGS)."""
    from megatron.core import dist_checkpointing

    path = Path(ckpt_dir)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(metadata=_sharded_metadata()), str(path))
    return path

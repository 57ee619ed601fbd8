"""The PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as
``PeftModel.save_pretrained`` writes it): write one from a PEFT model's tensors, read one back.

A leaf module (it imports nothing else of qnext but errors and fsutil), so that the exporter
(``qnext.export``) and the Megatron LoRA code (``qnext.lora.peft_io``) can both use it without
importing each other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .errors import UserError
from .fsutil import atomic_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_peft_adapter(
    peft_model,
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    base_checkpoint: str | os.PathLike | None = None,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as ``PeftModel.save_pretrained``
    does, from full (unsharded) tensors keyed like ``peft_model.state_dict()``."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(peft_model, state_dict=dict(state_dict), adapter_name=adapter_name)
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    if base_checkpoint is not None:
        config.base_model_name_or_path = str(Path(base_checkpoint).resolve())
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
    return Path(out_dir)


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{adapter_dir} is not a PEFT adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})",
                        hint="point at <output_dir>/adapter or <output_dir>/checkpoints/step_N/adapter")
    return json.loads(cfg_path.read_text()), load_file(str(w_path))

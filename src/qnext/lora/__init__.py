"""LoRA for the Megatron backend, equivalent to HF PEFT on transformers' Qwen3-Next.

- ``plan``: HF targets -> Megatron linears and each branch's rows, read off the weight map.
- ``layers``: the LoRA linear (local and Transformer Engine, column/row parallel, sequence parallel),
  its merge and its ``sharded_state_dict`` entries (torch_dist checkpoints).
- ``apply``: ``apply_lora`` / ``merge_lora`` / ``unmerge_lora`` / ``remove_lora`` on a model.
- ``peft_io``: export to and load from a PEFT adapter directory (from a live model, or offline from
  a torch_dist checkpoint, where the LoRA tensors are stored in HF layout); the directory format
  itself is ``qnext.peft_format``.

Typical use (after ``qnext.megatron.model.build_model`` + ``load_torch_dist``)::

    apply_lora(model, recipe.train.lora, hf_config=hf_config, seed=recipe.train.seed)
    ...train...
    export_peft_adapter(model, "out/adapter", base_model=hf_checkpoint)
"""
from .apply import apply_lora, lora_modules, lora_parameters, merge_lora, remove_lora, unmerge_lora
from .peft_io import (
    checkpoint_lora_tensors,
    export_adapter_from_checkpoint,
    export_peft_adapter,
    hf_lora_tensors,
    load_peft_adapter,
    lora_config_from_adapter,
)

__all__ = [
    "apply_lora",
    "checkpoint_lora_tensors",
    "export_adapter_from_checkpoint",
    "export_peft_adapter",
    "hf_lora_tensors",
    "load_peft_adapter",
    "lora_config_from_adapter",
    "lora_modules",
    "lora_parameters",
    "merge_lora",
    "remove_lora",
    "unmerge_lora",
]

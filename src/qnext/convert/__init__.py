"""HF <-> Megatron torch_dist conversion on CPU, streaming, driven by the weight map in
``qnext.models.<arch>``. ``convert_hf_to_torch_dist`` / ``export_torch_dist_to_hf`` are the entry
points (``tools/convert_*.py`` and ``make convert`` / ``make export`` call them)."""
from .hf_to_megatron import ConvertSummary, convert_hf_to_torch_dist, inspect_hf_checkpoint
from .megatron_dir import copy_hf_meta, hf_meta_dir, resolve_iteration_dir
from .megatron_to_hf import ExportSummary, export_torch_dist_to_hf

__all__ = [
    "ConvertSummary",
    "ExportSummary",
    "convert_hf_to_torch_dist",
    "copy_hf_meta",
    "export_torch_dist_to_hf",
    "hf_meta_dir",
    "inspect_hf_checkpoint",
    "resolve_iteration_dir",
]

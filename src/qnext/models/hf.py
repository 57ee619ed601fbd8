"""The HF (transformers 5.17) Qwen3-Next model: loading, and the switch to its pure-torch GDN path.

Why the switch: transformers picks the Gated DeltaNet / short-conv implementation once, when
``modeling_qwen3_next`` is imported -- fla's Triton kernels if ``fla`` imports, else its own torch
reference -- and then calls that choice for every tensor. fla's kernels cannot run on CPU tensors
("0 active drivers"), so a CPU model must call the torch functions instead. They are still there:
each module-level kernel entry point is a ``functools.wraps`` wrapper whose ``__wrapped__`` is the
torch reference; :func:`force_torch_gdn_path` rebinds the module's names to those.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Iterator

import torch

from ..errors import UserError

# Module-level kernel entry points of transformers' modeling_qwen3_next that may be bound to fla /
# causal-conv1d kernels; the GDN forward looks them up by these names at call time.
GDN_KERNEL_NAMES = (
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}", hint="use float32, bfloat16 or float16") from None


def _modeling():
    from transformers.models.qwen3_next import modeling_qwen3_next

    return modeling_qwen3_next


def _binding(mod, name: str):
    """The kernel a name calls: behind qnext's packed-sequence wrapper (``hf_packed``), what it wraps."""
    from .hf_packed import is_packed_binding

    fn = getattr(mod, name)
    return fn.previous if is_packed_binding(fn) else fn


def _rebind(mod, name: str, fn) -> None:
    """Bind ``name`` to ``fn``, under the packed-sequence wrapper when there is one."""
    from .hf_packed import is_packed_binding

    current = getattr(mod, name)
    if is_packed_binding(current):
        current.previous = fn
    else:
        setattr(mod, name, fn)


def gdn_kernels() -> dict[str, str]:
    """What each GDN entry point calls now (for unpacked rows): ``"torch"`` or the kernel's qualified name."""
    mod = _modeling()
    out = {}
    for name in GDN_KERNEL_NAMES:
        fn = _binding(mod, name)
        torch_fn = inspect.unwrap(fn)
        impl = torch_fn if fn is torch_fn else inspect.getclosurevars(fn).nonlocals.get("implementation", torch_fn)
        out[name] = "torch" if impl is torch_fn else f"{impl.__module__}.{getattr(impl, '__qualname__', impl)}"
    return out


def force_torch_gdn_path() -> dict[str, object]:
    """Make transformers' Qwen3-Next call its torch GDN / conv reference (needed on CPU with fla installed).

    Process-wide and idempotent; returns the previous bindings (pass them to :func:`restore_gdn_path`).
    Use it for CPU models only: on GPU it would trade fla's kernels for the slow reference.
    """
    mod = _modeling()
    previous = {}
    for name in GDN_KERNEL_NAMES:
        fn = _binding(mod, name)
        previous[name] = fn
        _rebind(mod, name, inspect.unwrap(fn))
    return previous


def restore_gdn_path(previous: dict[str, object]) -> None:
    mod = _modeling()
    for name, fn in previous.items():
        _rebind(mod, name, fn)


@contextlib.contextmanager
def torch_gdn_path() -> Iterator[None]:
    """``with torch_gdn_path(): ...`` -- the torch GDN path inside the block, the previous one after."""
    previous = force_torch_gdn_path()
    try:
        yield
    finally:
        restore_gdn_path(previous)


def load_hf_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
                  strict: bool = True, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` on an HF checkpoint directory, moved to ``device``.

    On CPU the torch GDN path is forced first. Packed rows (``cu_seq_lens_q`` / ``cu_seqlens`` from
    ``qnext.fsdp.model.batch_to_device``) keep their chats apart: ``hf_packed.install`` runs first. ``strict``: a tensor the model expects but the
    checkpoint lacks is an error (transformers would silently initialise it at random); the MTP
    tensors (``mtp.*``), which transformers does not use, are ignored.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise UserError(f"{p} is not an HF checkpoint directory (no config.json)",
                        hint="point at a directory with config.json and *.safetensors (e.g. tools/make_tiny_checkpoint.py)")
    dev = torch.device(device)
    from . import hf_packed

    hf_packed.install()
    if dev.type == "cpu":
        force_torch_gdn_path()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(p), dtype=to_dtype(dtype), output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys") or [])
    if strict and missing:
        raise UserError(f"{p}: the checkpoint lacks {len(missing)} tensors the model needs, e.g. {sorted(missing)[:3]}",
                        hint="the checkpoint is incomplete or for another architecture; re-download or re-create it")
    return model.to(dev)

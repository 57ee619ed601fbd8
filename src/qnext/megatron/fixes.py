"""Run-time corrections to megatron-core found by this repository's checks (``install_all``, called by
``qnext.megatron.model.build_model``; ``QNEXT_MEGATRON_FIXES=0`` turns them off).

``install_thd_rope_vectorized``: RoPE of packed sequences in one pass instead of one per sequence (see
``_thd_rope_vectorized``).

``install_router_token_count_fix``: the router load-balancing (aux) loss gradient under tensor or
context parallelism.

With ``--calculate-per-token-loss`` and a padding mask (the Megatron entry passes one with every batch),
megatron-core 0.19.2's router multiplies each rank's share of the aux loss by ``local_num_tokens *
tp_cp_size``, and takes ``local_num_tokens`` from ``get_tokens_per_expert_and_token_count``. That
function all-reduces its per-expert count *in place* before it reads the local count from the same
buffer, so ``local_num_tokens`` is the group's total: every rank's aux-loss gradient comes out
``tp_cp_size`` times too large. ``python -m qnext.megatron.layout_check`` measured it on the tiny model:
at TP2 with sequence parallelism the router weights' aux-loss gradient is exactly 2x the single-rank
one, all other gradients agree (the upstream report is Megatron-LM pull request 7481).

Even with the count read correctly (as upstream intends), ``local_num_tokens * tp_cp_size`` equals the
group's total only when the valid tokens are split evenly between the ranks, which padding at the end
of a sequence makes false (at TP2 the first half of a short chat holds all its tokens). The multiplier
that makes the step independent of the layout is the group's total valid-token count: each rank's
share of the aux loss, summed over the group, is then weighted exactly as on one rank. So the wrapper
returns ``total / group size`` as the local count, which megatron multiplies back by the group size.
qnext configures ``moe_router_load_balancing_type='aux_loss'`` only, the path this was measured on
(``tests/integration/test_megatron_grad_layouts.py``); the sequence-wise and global aux losses, which
call the same function with other groups, are not used here and were not checked.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

PINNED_MEGATRON_CORE = "0.19.2"  # the version every fix here was measured against (pyproject.toml's pin)
_version_checked = False


def check_megatron_core_version(installed: str | None = None) -> str | None:
    """Warn once per process when the installed megatron-core is not the pinned one: each fix names
    behaviour of that version, and another one may have fixed, moved or changed what is patched.
    Returns the warning text (None when the versions match or it was already said)."""
    global _version_checked
    if _version_checked:
        return None
    _version_checked = True
    if installed is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("megatron-core")
        except PackageNotFoundError:
            return None
    if installed == PINNED_MEGATRON_CORE:
        return None
    text = (f"megatron-core {installed} is installed; qnext.megatron.fixes and resume were written and checked for "
            f"{PINNED_MEGATRON_CORE}. Re-run `make grad-layouts` and the resume tests before trusting a run, "
            "or install the pinned version (make setup)")
    warnings.warn(text, RuntimeWarning, stacklevel=2)
    return text


def _install(module_name: str, attr: str, wrap) -> bool:
    """Replace ``module_name.attr`` by ``wrap(original)`` once (the wrapper is marked ``qnext_fixed``);
    True when the replacement is (now) in place. ``QNEXT_MEGATRON_FIXES=0`` leaves megatron as it is (to
    measure what a fix changes), and a megatron without the function is left alone too."""
    if os.environ.get("QNEXT_MEGATRON_FIXES", "1") == "0":
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    original = getattr(module, attr, None)
    if original is None:
        return False
    if not getattr(original, "qnext_fixed", False):
        fixed = wrap(original)
        fixed.qnext_fixed = True
        setattr(module, attr, fixed)
    return True


def _router_token_count(original):
    """megatron's ``get_tokens_per_expert_and_token_count`` with the group's total as the multiplier (above)."""

    @functools.wraps(original)
    def fixed(routing_map, reduce_group, topk=None, with_padding_mask=False):
        global_tokens, local_num, total_num = original(routing_map, reduce_group, topk=topk,
                                                       with_padding_mask=with_padding_mask)
        size = reduce_group.size() if reduce_group is not None else 1
        if with_padding_mask and size > 1:
            local_num = total_num / size
        return global_tokens, local_num, total_num

    return fixed


def install_router_token_count_fix() -> bool:
    """Wrap megatron's ``get_tokens_per_expert_and_token_count`` as the router imported it; idempotent."""
    return _install("megatron.core.transformer.moe.router", "get_tokens_per_expert_and_token_count",
                    _router_token_count)


def _thd_rope_vectorized(original):
    """megatron's ``_apply_rotary_pos_emb_thd`` without its loop over the packed sequences, where it can.

    Without Transformer Engine megatron applies RoPE to a packed (``thd``) batch one sequence at a time
    (``torch.split`` by ``cu_seqlens``, then a slice, a rotation and a copy per sequence), which for
    a 4096-token pack of short chats is hundreds of small kernels per attention layer and pass. The
    same rotation for the whole pack at once: each token's position within its own sequence
    (``arange(T) - start of its sequence``) selects its row of ``freqs``, and megatron's ``bshd`` rotation
    runs once. Element for element the arithmetic is megatron's, so the result is bit-equal
    (``tests/unit/test_megatron_fixes.py``). Context parallelism and per-token ("packed") frequency tables
    keep megatron's own code."""
    from megatron.core.models.common.embeddings import rope_utils

    @functools.wraps(original)
    def rope_thd(t, cu_seqlens, freqs, rotary_interleaved=False, mla_rotary_interleaved=False, mscale=1.0,
                 cp_group=None, multi_latent_attention=None):
        import torch

        total = t.shape[0]
        plain = (cp_group is not None and cp_group.size() == 1 and multi_latent_attention is None
                 and not (freqs.dim() >= 1 and freqs.size(0) == total))
        if not plain:
            return original(t, cu_seqlens, freqs, rotary_interleaved=rotary_interleaved,
                            mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale, cp_group=cp_group,
                            multi_latent_attention=multi_latent_attention)
        cu = cu_seqlens.to(device=t.device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
        positions = torch.arange(total, device=t.device) - starts
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[positions], rotary_interleaved=rotary_interleaved,
            mla_rotary_interleaved=mla_rotary_interleaved, mscale=mscale).squeeze(1)

    return rope_thd


def install_thd_rope_vectorized() -> bool:
    """Replace megatron's per-sequence ``thd`` RoPE loop by ``_thd_rope_vectorized``; idempotent."""
    return _install("megatron.core.models.common.embeddings.rope_utils", "_apply_rotary_pos_emb_thd",
                    _thd_rope_vectorized)


def install_all() -> None:
    """Every run-time correction in this module (each is idempotent); warns once on another megatron-core."""
    check_megatron_core_version()
    install_router_token_count_fix()
    install_thd_rope_vectorized()

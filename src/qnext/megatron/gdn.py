"""megatron-core's Gated DeltaNet with fla's kernels called the way fla is fastest.

megatron-core 0.19.2 prepares the delta rule's inputs itself: it L2-normalises q and k with a
separate kernel, repeats the 16 key heads to the 32 value heads (``repeat_interleave``, a copy of q
and k twice their size), and hands fla's chunked kernel and causal conv the ``cu_seqlens`` of a packed
row on the GPU only, from which fla derives its chunk tables with a device read or a blocking
host-to-device copy (each a device sync) per call. fla 0.6 does all three itself:
``use_qk_l2norm_in_kernel``, grouped value heads (a value head reads key head ``hv // (HV / H)``, the
same mapping as ``repeat_interleave``) and ``cu_seqlens_cpu``.

:class:`QnextGatedDeltaNet` is megatron's module (same parameters, checkpoint keys and forward)
with those three handed to fla. It applies where megatron would call fla's chunked kernel (not in
``deterministic_mode``, megatron's torch path on CPU); it is the default, and ``QNEXT_GDN_FLA_NATIVE=0``
selects megatron's own preparation (the reference). ``tests/gpu/test_megatron_model_gpu.py`` compares the
two, values and gradients; it passed on an H200 on 2026-12-03
(``benchmarks/results/gpu_checks_2026-12-03_h200/``). The host
copy of ``cu_seqlens`` and the chunk table built from it once per micro-batch
(``qnext.megatron.data.chunk_indices``, copied from pinned memory without waiting) go to fla's chunked
rule and causal conv on both paths: they replace the table fla would otherwise build, and copy with a
sync, in every layer.

The host copy of ``cu_seqlens`` travels on the device tensor itself (``qnext.megatron.data.attach_host_copy``,
called where the packed row's parameters are built), so nothing in the layer reads the device.
"""
from __future__ import annotations

import torch

from megatron.core.ssm.gated_delta_net import common as _common
from megatron.core.ssm.gated_delta_net import gdn as _gdn
from megatron.core.ssm.gated_delta_net.gdn import GatedDeltaNet

from .data import chunk_indices, host_copy
from .switches import switch_on

ENV = "QNEXT_GDN_FLA_NATIVE"
def fla_native_enabled() -> bool:
    """On unless ``QNEXT_GDN_FLA_NATIVE=0`` (``test_fast_paths_match_the_reference_paths`` passed on a GPU)."""
    return switch_on(ENV, True)


CHUNK = 64  # the chunk size of fla 0.6's causal conv and chunked delta rule (their defaults, as megatron calls them)


def _conv_with_host_lengths(*args, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None, **kwargs):
    """fla's ``causal_conv1d`` as megatron calls it, plus the host copy of ``cu_seqlens`` and the chunk
    table built from it when known (no device sync; ``qnext.megatron.data.chunk_indices``)."""
    if cu_seqlens_cpu is None:
        cu_seqlens_cpu = host_copy(cu_seqlens)
    return _FLA_CONV(*args, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                     chunk_indices=_table(chunk_indices, cu_seqlens, kwargs), **kwargs)


_FLA_CONV = _gdn.causal_conv1d


def _table(given, cu_seqlens, kwargs: dict):
    """The caller's ``chunk_indices`` if given, else the cached table of ``cu_seqlens`` when fla will use
    chunks of :data:`CHUNK` (None without a host copy: fla then builds its own)."""
    if given is not None or cu_seqlens is None or kwargs.get("chunk_size", CHUNK) != CHUNK:
        return given
    return chunk_indices(cu_seqlens, CHUNK)


def _rule_with_host_lengths(*args, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None, **kwargs):
    """fla's ``chunk_gated_delta_rule`` exactly as megatron calls it, plus the host copy of ``cu_seqlens``
    and its chunk table."""
    if cu_seqlens_cpu is None:
        cu_seqlens_cpu = host_copy(cu_seqlens)
    return _common.chunk_gated_delta_rule(*args, cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu,
                                          chunk_indices=_table(chunk_indices, cu_seqlens, kwargs), **kwargs)


def _install_conv() -> None:
    """megatron's GDN module calls its imported ``causal_conv1d``; point that name at the wrapper
    (identical behaviour, fewer syncs). Idempotent."""
    if _gdn.causal_conv1d is _FLA_CONV and _FLA_CONV is not None:
        _gdn.causal_conv1d = _conv_with_host_lengths


class QnextGatedDeltaNet(GatedDeltaNet):
    """megatron's ``GatedDeltaNet`` with q/k L2 norm, grouped value heads and host ``cu_seqlens``
    handed to fla (see the module docstring)."""

    def _setup_variant_attrs(self):
        super()._setup_variant_attrs()
        rule = _common.chunk_gated_delta_rule
        uses_fla = rule is not None and self.gated_delta_rule is rule and self.cp_size == 1
        self.fla_native = uses_fla and fla_native_enabled()
        if uses_fla:
            # both paths hand fla the host copy of cu_seqlens (same chunk tables, no device sync)
            self.gated_delta_rule = self._fla_rule if self.fla_native else _rule_with_host_lengths
            _install_conv()

    def _fla_rule(self, query, key, value, *, g, beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=False, cu_seqlens=None, chunk_indices=None, **kwargs):
        return _common.chunk_gated_delta_rule(
            query, key, value, g=g, beta=beta, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=self.use_qk_l2norm or use_qk_l2norm_in_kernel, cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=host_copy(cu_seqlens), chunk_indices=_table(chunk_indices, cu_seqlens, kwargs),
            **kwargs)

    def _prepare_input_for_gated_delta_rule(self, qkv, gate, batch, seq_len, *gate_feats):
        if not self.fla_native:
            return super()._prepare_input_for_gated_delta_rule(qkv, gate, batch, seq_len, *gate_feats)
        query_key, value = torch.split(qkv, [2 * self.qk_dim_local_tp, self.v_dim_local_tp], dim=-1)
        query, key = torch.split(query_key.reshape(batch, seq_len, -1, self.key_head_dim),
                                 [self.num_k_heads_local_tp] * 2, dim=2)
        value = value.reshape(batch, seq_len, -1, self.value_head_dim)
        # the kernel normalises q/k and maps each value head to its key head itself
        return (query.contiguous(), key.contiguous(), value.contiguous(), gate.contiguous(),
                *(t.contiguous() for t in gate_feats))

    def _resolve_cu_seqlens(self, cu_seqlens_padded, cu_seqlens_actual, total_seq_len, name, cp_size: int = 1):
        """megatron checks ``cu_seqlens[-1]`` and the lengths' divisibility by cp on the host (two device
        syncs per layer). Where the host copy is known the same checks run on it, for free."""
        cu = cu_seqlens_padded if cu_seqlens_padded is not None else cu_seqlens_actual
        host = host_copy(cu)
        if host is None:
            return super()._resolve_cu_seqlens(cu_seqlens_padded, cu_seqlens_actual, total_seq_len, name, cp_size)
        if int(host[-1]) != total_seq_len:
            raise ValueError(f"GDN: {name}[-1]={int(host[-1])} does not match total_sequence_length={total_seq_len}")
        if bool(((host[1:] - host[:-1]) % cp_size != 0).any()):
            raise ValueError(f"GDN: every sequence length in {name} must be divisible by cp_size={cp_size}")
        return cu

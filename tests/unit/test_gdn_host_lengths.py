"""The host copy of a packed row's ``cu_seqlens`` travels from the data module to fla's kernel calls
(``qnext.megatron.gdn``): fla then builds its chunk tables without reading the device. fla's kernels need a
GPU, so here the two callees are replaced by recorders; the wrappers and the data path are the real ones."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")


def test_packed_seq_params_carry_the_host_copy():
    from qnext.megatron.data import megatron_batch, packed_seq_params, to_device
    from qnext.megatron.data import host_copy

    sample = {"input_ids": list(range(10)), "labels": list(range(10)), "seq_lens": [3, 4, 3],
              "position_ids": [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]}
    batch = to_device(megatron_batch([sample], 0, 12, pack=True), torch.device("cpu"))
    psp = packed_seq_params(batch)
    host = host_copy(psp.cu_seqlens_q)
    assert host is not None and host.device.type == "cpu" and host.dtype == torch.int64
    assert host.tolist() == psp.cu_seqlens_q.tolist() == [0, 3, 7, 10, 12]  # the padding tail is a segment
    assert psp.cu_seqlens_q is psp.cu_seqlens_kv  # one object: megatron's equality checks need no device read


def test_fla_calls_get_the_host_copy(monkeypatch):
    from megatron.core.ssm.gated_delta_net import common

    from qnext.megatron import gdn
    from qnext.megatron.data import attach_host_copy

    seen = []
    monkeypatch.setattr(common, "chunk_gated_delta_rule", lambda *a, **kw: seen.append(("rule", kw)) or "out")
    monkeypatch.setattr(gdn, "_FLA_CONV", lambda *a, **kw: seen.append(("conv", kw)) or "out")
    cu = attach_host_copy(torch.tensor([0, 5, 9], dtype=torch.int32), torch.tensor([0, 5, 9]))
    assert gdn._rule_with_host_lengths("q", "k", "v", g="g", beta="b", cu_seqlens=cu) == "out"
    assert gdn._conv_with_host_lengths(x="x", cu_seqlens=cu) == "out"
    gdn._rule_with_host_lengths("q", cu_seqlens=torch.tensor([0, 9]))  # no host copy known: fla reads it itself
    gdn._conv_with_host_lengths(x="x", cu_seqlens=None)  # not packed
    (_, rule), (_, conv), (_, rule_plain), (_, conv_plain) = seen
    for kw in (rule, conv):
        assert kw["cu_seqlens"] is cu and kw["cu_seqlens_cpu"].tolist() == [0, 5, 9]
        assert kw["cu_seqlens_cpu"].device.type == "cpu"
    assert rule["g"] == "g" and rule["beta"] == "b"  # everything else passes through
    assert rule_plain["cu_seqlens_cpu"] is None and conv_plain["cu_seqlens_cpu"] is None

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


def test_chunk_table_is_flas():
    """The table built on the host equals fla's own ``prepare_chunk_indices`` (random packed rows, both chunk
    sizes fla uses, sequences shorter than, equal to and longer than a chunk) and is built once per row."""
    fla_index = pytest.importorskip("fla.ops.utils.index")
    from qnext.megatron.data import attach_host_copy, chunk_indices, chunk_table

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        lens = torch.randint(1, 300, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        if trial == 0:
            lens = torch.tensor([64, 1, 128, 65])
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
        for size in (16, 64):
            assert torch.equal(chunk_table(cu, size), fla_index.prepare_chunk_indices(cu, size)), (lens, size)
    dev = attach_host_copy(torch.tensor([0, 5, 200], dtype=torch.int32), torch.tensor([0, 5, 200]))
    table = chunk_indices(dev, 64)
    assert table.dtype == torch.int32 and table.tolist() == [[0, 0], [1, 0], [1, 1], [1, 2], [1, 3]]  # 5 and 195 tokens
    assert chunk_indices(dev, 64) is table  # cached on the row: one build for all layers
    assert chunk_indices(torch.tensor([0, 5]), 64) is None  # no host copy: fla builds its own


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
    own = torch.zeros(1, 2, dtype=torch.int32)
    gdn._conv_with_host_lengths(x="x", cu_seqlens=cu, chunk_indices=own)  # the caller's table wins
    gdn._conv_with_host_lengths(x="x", cu_seqlens=cu, chunk_size=16)  # another chunk size: fla builds it
    (_, rule), (_, conv), (_, rule_plain), (_, conv_plain), (_, conv_own), (_, conv_16) = seen
    for kw in (rule, conv):
        assert kw["cu_seqlens"] is cu and kw["cu_seqlens_cpu"].tolist() == [0, 5, 9]
        assert kw["cu_seqlens_cpu"].device.type == "cpu"
        assert kw["chunk_indices"].tolist() == [[0, 0], [1, 0]]
    assert rule["chunk_indices"] is conv["chunk_indices"]  # built once for the row
    assert rule["g"] == "g" and rule["beta"] == "b"  # everything else passes through
    assert rule_plain["cu_seqlens_cpu"] is None and conv_plain["cu_seqlens_cpu"] is None
    assert rule_plain["chunk_indices"] is None and conv_plain["chunk_indices"] is None
    assert conv_own["chunk_indices"] is own and conv_16["chunk_indices"] is None and conv_16["chunk_size"] == 16

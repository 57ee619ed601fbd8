"""GDN in_proj layout against transformers' own Qwen3NextGatedDeltaNet.fix_query_key_value_ordering
and megatron-core's in_proj split (restated from GatedDeltaNet.forward). Slow only because
importing transformers' Qwen3-Next module imports fla."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from convert_fixtures import small_config  # noqa: E402

from qnext.models.qwen3_next import GdnInProj, Qwen3NextDims  # noqa: E402

pytestmark = pytest.mark.slow


def test_gdn_in_proj_layout_matches_hf_and_megatron():
    """HF's fix_query_key_value_ordering and megatron's in_proj split agree after the transform."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    cfg = small_config()
    hf = Qwen3NextGatedDeltaNet(Qwen3NextConfig(**cfg), layer_idx=0)
    d = Qwen3NextDims.from_hf_config(cfg)
    x = torch.randn(2, 5, d.hidden)
    with torch.no_grad():
        q, k, v, z, b, a = hf.fix_query_key_value_ordering(hf.in_proj_qkvz(x), hf.in_proj_ba(x))
        sections = GdnInProj().to_megatron([hf.in_proj_qkvz.weight, hf.in_proj_ba.weight], d)
        out = x @ torch.cat(sections).T
    # megatron GatedDeltaNet.forward (TP=1): split(qkvzba, (2*qk + v, v, nv, nv)); qkv -> (2*qk, v)
    qkv, gate, beta, alpha = torch.split(out, [2 * d.qk_dim + d.v_dim, d.v_dim, d.nv, d.nv], dim=-1)
    mq, mk, mv = torch.split(qkv, [d.qk_dim, d.qk_dim, d.v_dim], dim=-1)
    flat = lambda t: t.reshape(2, 5, -1)  # noqa: E731
    for hf_t, mg_t in ((q, mq), (k, mk), (v, mv), (z, gate), (b, beta), (a, alpha)):
        torch.testing.assert_close(flat(hf_t), mg_t, rtol=0, atol=1e-6)

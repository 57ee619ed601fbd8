"""slime's checkpoint layout (``--format slime``, ``make relayout``): slime's key names and shapes
(golden manifest from slime's source), bit-exact round trips through HF and through our layout,
logits through transformers' modules from the slime tensors, the MTP ``eh_proj`` column order, and
one clear message for a checkpoint of the other layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qnext.convert import convert_hf_to_torch_dist, export_torch_dist_to_hf
from qnext.convert.dcp_io import DcpReader, DcpWriter
from qnext.convert.relayout import relayout_torch_dist
from qnext.errors import UserError

from convert_fixtures import REPO, small_config, write_hf_checkpoint
from test_convert_errors import _fails, _tool
from test_convert_roundtrip import assert_bit_identical

MANIFEST = REPO / "tests/fixtures/slime_tiny_qwen3_next_manifest.json"
GDN_NORM = "decoder.layers.0.self_attention.out_norm.weight"  # ours: zero-centred (w - 1)


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def slime(hf_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slime") / "ckpt"
    convert_hf_to_torch_dist(hf_ckpt, out, fmt="slime", progress=False, log=None)
    return out


@pytest.fixture(scope="module")
def ours(hf_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ours") / "ckpt"
    convert_hf_to_torch_dist(hf_ckpt, out, progress=False, log=None)
    return out


def _load(ckpt: Path) -> dict[str, torch.Tensor]:
    r = DcpReader(ckpt / "release")
    try:
        return {k: r.read(k) for k in r.tensors()}
    finally:
        r.close()


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), f"{k}: bytes differ"


def test_slime_keys_shapes_dtypes_match_the_golden_manifest(tmp_path):
    """The tiny config as it is (full vocabulary), bf16 as slime's converter writes it."""
    manifest = json.loads(MANIFEST.read_text())
    assert "624b824" in manifest["sources"]["slime"]
    hf = write_hf_checkpoint(tmp_path / "hf", overrides=None, dtype=torch.bfloat16, max_shard_bytes=50 * 2**20,
                             odd_norm=False)
    convert_hf_to_torch_dist(hf, tmp_path / "slime", fmt="slime", progress=False, log=None)
    r = DcpReader(tmp_path / "slime" / "release")
    got = {k: {"shape": list(md.size), "dtype": str(md.properties.dtype).removeprefix("torch.")}
           for k, md in r.tensors().items()}
    r.close()
    want = manifest["tensors"]
    assert sorted(got) == sorted(want), f"only ours: {sorted(set(got) - set(want))[:4]}, only slime's: {sorted(set(want) - set(got))[:4]}"
    for k in want:
        assert got[k] == want[k], f"{k}: {got[k]} vs slime's {want[k]}"
    assert not (tmp_path / "slime" / "release" / "run_config.yaml").exists()  # Bridge cannot read slime's layout


def test_hf_to_slime_to_hf_is_bit_exact(slime, hf_ckpt, tmp_path):
    export_torch_dist_to_hf(slime, tmp_path / "back", fmt="slime", progress=False, log=None)
    assert_bit_identical(hf_ckpt, tmp_path / "back")


def test_slime_holds_hf_layouts_and_the_plain_gated_norm(slime, ours):
    s, o = _load(slime), _load(ours)
    norm = s["decoder.layers.0.self_attention.linear_attn.norm.weight"]
    assert torch.equal(norm[1:], o[GDN_NORM][1:] + 1)  # plain weight in slime's, w - 1 in ours
    eh_s, eh_o = s["mtp.layers.0.eh_proj.weight"], o["mtp.layers.0.eh_proj.weight"]
    h = eh_o.shape[0]
    assert torch.equal(eh_s[:, :h], eh_o[:, h:]) and torch.equal(eh_s[:, h:], eh_o[:, :h])  # slime's halves swapped


def test_ours_to_slime_to_ours_is_bit_exact(ours, slime, tmp_path):
    relayout_torch_dist(ours, tmp_path / "s", to="slime", log=None)
    _assert_same_tensors(_load(tmp_path / "s"), _load(slime))  # same as converting HF straight to slime
    relayout_torch_dist(tmp_path / "s", tmp_path / "o", to="megatron", log=None)
    _assert_same_tensors(_load(tmp_path / "o"), _load(ours))
    relayout_torch_dist(slime, tmp_path / "o2", to="megatron", log=None)  # slime's own checkpoint -> ours
    _assert_same_tensors(_load(tmp_path / "o2"), _load(ours))


def _copy_with(src: Path, dst: Path, key: str, edit) -> None:
    """A copy of a torch_dist checkpoint with one tensor edited and no exact-restore record (as a
    training run of ours would save it)."""
    r = DcpReader(src / "release")
    w = DcpWriter(dst / "release")
    tensors = r.tensors()
    for k, md in tensors.items():
        w.declare(k, tuple(md.size), md.properties.dtype)
    w.open("__0_0.distcp")
    for k in tensors:
        t = r.read(k)
        w.add_chunk(k, (0,) * t.dim(), edit(t) if k == key else t)
    for obj in r.objects():
        w.add_object(obj, None)
    w.finish()
    r.close()
    for name in ("common.pt", "metadata.json"):
        shutil.copy(src / "release" / name, dst / "release" / name)
    shutil.copy(src / "latest_checkpointed_iteration.txt", dst)
    shutil.copytree(src / "hf", dst / "hf", ignore=shutil.ignore_patterns("exact.safetensors"))


def test_trained_norm_that_plus_one_rounds_away_survives_the_round_trip(ours, tmp_path):
    def tiny_value(t):
        t = t.clone()
        t[0] = 1e-9  # (1e-9 + 1) - 1 == 0 in float32
        return t

    _copy_with(ours, tmp_path / "trained", GDN_NORM, tiny_value)
    relayout_torch_dist(tmp_path / "trained", tmp_path / "s", to="slime", log=None)
    assert _load(tmp_path / "s")["decoder.layers.0.self_attention.linear_attn.norm.weight"][0] == 1.0
    relayout_torch_dist(tmp_path / "s", tmp_path / "o", to="megatron", log=None)
    back = _load(tmp_path / "o")
    assert back[GDN_NORM][0] == torch.tensor(1e-9)
    _assert_same_tensors(back, _load(tmp_path / "trained"))


def test_logits_from_slime_tensors_through_transformers_modules(slime, hf_ckpt, tmp_path):
    """What slime's spec runs in a linear-attention layer is transformers' Gated DeltaNet and
    Qwen3-Next RMSNorm; loaded straight from the slime keys (strict), the model's logits equal the
    original HF model's."""
    from qnext.models.hf import load_hf_model

    export_torch_dist_to_hf(slime, tmp_path / "hf", fmt="slime", progress=False, log=None)
    ref = load_hf_model(hf_ckpt).eval()
    model = load_hf_model(tmp_path / "hf").eval()
    tensors = _load(slime)
    cfg = model.config
    gdn_layers = [i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"]
    assert gdn_layers
    for i in gdn_layers:
        layer = model.model.layers[i]
        for module, prefix in ((layer.linear_attn, f"decoder.layers.{i}.self_attention.linear_attn."),
                               (layer.input_layernorm, f"decoder.layers.{i}.self_attention.input_layernorm.")):
            with torch.no_grad():
                for p in module.parameters():
                    p.zero_()  # whatever the export put there is gone
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(own, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"


def test_mtp_eh_proj_order_follows_megatron_core_and_vllm(ours, slime, hf_ckpt, monkeypatch):
    """megatron-core 0.19.2's own ``_concat_embeddings`` with our eh_proj gives the projection that
    vLLM's Qwen3-Next MTP computes from HF ``mtp.fc`` (fc([norm_e(embedding); norm_h(hidden)]));
    with slime's swapped halves it does not."""
    import megatron.core.transformer.multi_token_prediction as mtp_mod
    from safetensors.torch import load_file
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm

    monkeypatch.setattr(mtp_mod, "gather_from_tensor_model_parallel_region", lambda x, group=None: x)
    hf = {}
    for f in sorted(hf_ckpt.glob("*.safetensors")):
        hf.update(load_file(str(f)))
    h = hf["mtp.fc.weight"].shape[0]

    def norm(w):
        n = Qwen3NextRMSNorm(h, eps=1e-6)
        n.weight.data.copy_(w)
        return n

    g = torch.Generator().manual_seed(1)
    emb, hidden = torch.randn(5, 1, h, generator=g), torch.randn(5, 1, h, generator=g)
    with torch.no_grad():
        e_n = norm(hf["mtp.pre_fc_norm_embedding.weight"])(emb)
        h_n = norm(hf["mtp.pre_fc_norm_hidden.weight"])(hidden)
        want = torch.cat([e_n, h_n], dim=-1) @ hf["mtp.fc.weight"].T  # vLLM qwen3_next_mtp.py order

    def megatron_projection(tensors):
        layer = SimpleNamespace(
            enorm=norm(tensors["mtp.layers.0.enorm.weight"]), hnorm=norm(tensors["mtp.layers.0.hnorm.weight"]),
            eh_proj=lambda x: (x @ tensors["mtp.layers.0.eh_proj.weight"].T, None),
            tp_group=None, sequence_parallel=False, config=SimpleNamespace(sequence_parallel=False))
        with torch.no_grad():
            return mtp_mod.MultiTokenPredictionLayer._concat_embeddings(layer, hidden, emb)

    assert torch.allclose(megatron_projection(_load(ours)), want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(megatron_projection(_load(slime)), want, atol=1e-3)


convert_main = _tool("convert_hf_to_torch_dist")
export_main = _tool("convert_torch_dist_to_hf")
relayout_main = _tool("convert_torch_dist_format")


def test_a_checkpoint_of_the_other_layout_is_one_clear_message(ours, slime, hf_ckpt, tmp_path, capsys):
    x = str(tmp_path / "x")
    _fails(export_main, ["--ckpt", str(slime), "--out", x, "--no-progress"], capsys,
           "slime-layout checkpoint", "--format slime")
    _fails(export_main, ["--ckpt", str(ours), "--out", x, "--format", "slime", "--no-progress"], capsys,
           "megatron-layout checkpoint", "--format megatron")
    _fails(export_main, ["--ckpt", str(ours), "--out", x, "--format", "bridge"], capsys, "unknown checkpoint format")
    _fails(convert_main, ["--hf", str(hf_ckpt), "--out", x, "--format", "slim"], capsys, "unknown checkpoint format")
    _fails(convert_main, ["--hf", str(slime), "--out", x], capsys, "is a Megatron torch_dist checkpoint", "make export")
    _fails(relayout_main, ["--ckpt", str(slime), "--out", x, "--to", "slime"], capsys, "already in the slime layout")
    _fails(relayout_main, ["--ckpt", str(ours), "--out", x, "--to", "megatron", "--from", "slime"], capsys,
           "megatron-layout checkpoint", "--from megatron")
    assert not Path(x).exists()


def test_weight_map_tables_cover_the_same_hf_tensors():
    from qnext.models.qwen3_next_formats import build_format_map

    cfg = small_config()
    a, b = build_format_map(cfg, 1, "megatron"), build_format_map(cfg, 1, "slime")
    assert a.hf_shapes == b.hf_shapes
    with pytest.raises(UserError, match="unknown checkpoint format"):
        build_format_map(cfg, 1, "nemo")

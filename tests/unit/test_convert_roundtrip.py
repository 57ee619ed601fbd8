"""Tiny HF -> torch_dist -> HF is bit-exact; the torch_dist directory is what Megatron's loader reads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qnext.convert import convert_hf_to_torch_dist, export_torch_dist_to_hf, resolve_iteration_dir
from qnext.convert.dcp_io import DcpReader
from qnext.models.qwen3_next import build_weight_map

from convert_fixtures import ODD_NORM, small_config, write_hf_checkpoint


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def converted(hf_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    convert_hf_to_torch_dist(hf_ckpt, out, progress=False, log=None)
    return out


def _tensors(hf_dir: Path) -> dict[str, tuple[str, torch.Tensor]]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        with safe_open(str(hf_dir / f), "pt") as sf:
            for name in sf.keys():
                out[name] = (f, sf.get_tensor(name))
    return out


def assert_bit_identical(a_dir: Path, b_dir: Path, same_files: bool = True) -> None:
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
    index_b = json.loads((b_dir / "model.safetensors.index.json").read_text())
    assert set(index_b["weight_map"]) == set(b), "index must cover every tensor"
    assert index_b["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _, t in b.values())
    for name, (fa, ta) in a.items():
        fb, tb = b[name]
        if same_files:
            assert fa == fb, f"{name}: in {fb}, originally in {fa}"
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, f"{name}: {tb.dtype} {list(tb.shape)} vs {ta.dtype} {list(ta.shape)}"
        assert torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)), f"{name}: bytes differ"


def test_layout_is_what_megatron_loads(converted):
    assert (converted / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    it = resolve_iteration_dir(converted)
    assert it == converted / "release"
    assert json.loads((it / "metadata.json").read_text()) == {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
    common = torch.load(it / "common.pt", weights_only=True)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["content_metadata"]["singleton_local_shards"] is False
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "layout.json"):
        assert (converted / "hf" / name).is_file()
    assert not list(converted.parent.glob(".ckpt.tmp-*")), "no temporary directory left behind"


def test_metadata_has_every_key_with_global_shape_and_dtype(converted, hf_ckpt):
    wm = build_weight_map(small_config(), mtp_layers=1)
    r = DcpReader(resolve_iteration_dir(converted))
    tensors = r.tensors()
    assert {k: tuple(v.size) for k, v in tensors.items()} == dict(wm.megatron_shapes)
    assert all(v.properties.dtype == torch.float32 for v in tensors.values())
    assert set(r.objects()) == {x.key for x in wm.extra_states}
    # experts: one chunk per HF tensor, at the expert's slot
    fc1 = tensors["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"]
    assert sorted(tuple(c.offsets) for c in fc1.chunks)[:3] == [(0, 0, 0), (0, 64, 0), (1, 0, 0)]
    with safe_open(str(hf_ckpt / json.loads((hf_ckpt / "model.safetensors.index.json").read_text())["weight_map"][
            "model.layers.0.mlp.experts.3.up_proj.weight"]), "pt") as sf:
        up = sf.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight")
    assert torch.equal(r.read("decoder.layers.0.mlp.experts.experts.linear_fc1.weight")[3, 64:], up)


def test_round_trip_is_bit_exact(converted, hf_ckpt, tmp_path):
    export_torch_dist_to_hf(converted, tmp_path / "hf", progress=False, log=None)
    assert_bit_identical(hf_ckpt, tmp_path / "hf")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (hf_ckpt / name).read_bytes(), name
    # the GDN output norm value where (w - 1) + 1 != w came back through the exact-restore record
    record = json.loads((converted / "hf" / "convert.json").read_text())
    assert ODD_NORM in record["exact_overrides"]


def test_round_trip_like_original_and_size_based(converted, hf_ckpt, tmp_path):
    export_torch_dist_to_hf(resolve_iteration_dir(converted), tmp_path / "like", like=hf_ckpt,
                            progress=False, log=None)
    assert_bit_identical(hf_ckpt, tmp_path / "like")
    export_torch_dist_to_hf(resolve_iteration_dir(converted), tmp_path / "sized", hf_meta=hf_ckpt,
                            max_shard_bytes=2_000_000, progress=False, log=None)
    files = sorted(p.name for p in (tmp_path / "sized").glob("*.safetensors"))
    assert files[0] == "model-00001-of-00004.safetensors" and len(files) == 4
    assert_bit_identical(hf_ckpt, tmp_path / "sized", same_files=False)


def test_dtype_option_casts(hf_ckpt, tmp_path):
    convert_hf_to_torch_dist(hf_ckpt, tmp_path / "bf16", dtype="bf16", progress=False, log=None)
    r = DcpReader(resolve_iteration_dir(tmp_path / "bf16"))
    assert {v.properties.dtype for v in r.tensors().values()} == {torch.bfloat16}
    # export "keep" restores the original dtype (float32 here); --dtype picks another
    export_torch_dist_to_hf(tmp_path / "bf16", tmp_path / "keep", progress=False, log=None)
    export_torch_dist_to_hf(tmp_path / "bf16", tmp_path / "hf", dtype="bf16", max_shard_bytes=10**9,
                            progress=False, log=None)
    with safe_open(str(next((tmp_path / "keep").glob("*.safetensors"))), "pt") as sf:
        assert {sf.get_tensor(k).dtype for k in sf.keys()} == {torch.float32}
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as sf:
        assert {sf.get_tensor(k).dtype for k in sf.keys()} == {torch.bfloat16}
        emb = sf.get_tensor("model.embed_tokens.weight")
    with safe_open(str(hf_ckpt / json.loads((hf_ckpt / "model.safetensors.index.json").read_text())["weight_map"][
            "model.embed_tokens.weight"]), "pt") as sf:
        assert torch.equal(emb, sf.get_tensor("model.embed_tokens.weight").bfloat16())


def test_bf16_original_round_trip_without_mtp(tmp_path):
    hf = write_hf_checkpoint(tmp_path / "hf", dtype=torch.bfloat16, with_mtp=False, seed=1)
    convert_hf_to_torch_dist(hf, tmp_path / "mg", progress=False, log=None)
    assert not any(k.startswith("mtp.") for k in DcpReader(resolve_iteration_dir(tmp_path / "mg")).tensors())
    export_torch_dist_to_hf(tmp_path / "mg", tmp_path / "back", progress=False, log=None)
    assert_bit_identical(hf, tmp_path / "back")


def test_single_file_checkpoint_without_index(hf_ckpt, tmp_path):
    from safetensors.torch import save_file

    one = tmp_path / "one"
    one.mkdir()
    tensors = {n: t for n, (_, t) in _tensors(hf_ckpt).items()}
    save_file(tensors, str(one / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json"):
        (one / name).write_bytes((hf_ckpt / name).read_bytes())
    convert_hf_to_torch_dist(one, tmp_path / "mg", progress=False, log=None)
    export_torch_dist_to_hf(tmp_path / "mg", tmp_path / "back", progress=False, log=None)
    assert sorted(p.name for p in (tmp_path / "back").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    with safe_open(str(tmp_path / "back" / "model.safetensors"), "pt") as sf:
        assert sorted(sf.keys()) == sorted(tensors)
        for n in sf.keys():
            assert torch.equal(sf.get_tensor(n).view(-1).view(torch.uint8), tensors[n].view(-1).view(torch.uint8)), n

"""The tiny random checkpoint: hub layout, on-disk names, loads in transformers, runs on CPU."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qnext.models.tiny import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
SMALL = {"vocab_size": 512}  # fast; everything else is models/tiny_qwen3_next/config.json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", overrides=SMALL, with_mtp=True,
                                 max_shard_bytes=300_000)


def _headers(d: Path) -> dict[str, str]:
    names = {}
    for shard in sorted(d.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for n in f.keys():
                assert n not in names, f"{n} in two shards"
                names[n] = shard.name
    return names


def test_hub_layout_and_index(ckpt):
    files = sorted(p.name for p in ckpt.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    for f in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert f in files, f
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    on_disk = _headers(ckpt)
    assert index["weight_map"] == on_disk  # the index covers every tensor, each where it really is
    total = 0
    for name, shard in on_disk.items():
        with safe_open(str(ckpt / shard), "pt") as f:
            t = f.get_slice(name)
            total += torch.Size(t.get_shape()).numel() * 4
    assert index["metadata"]["total_size"] == total
    names = set(on_disk)
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names and not any("gate_up_proj" in n for n in names)
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.0.down_proj.weight"} <= names
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_next" and cfg["vocab_size"] == 512 and cfg["torch_dtype"] == "float32"
    assert cfg["transformers_version"]  # as save_pretrained writes (its absence trips a tokenizer warning)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_loads_in_transformers_with_no_missing_keys_and_runs_on_cpu(ckpt):
    from transformers import AutoModelForCausalLM

    from qnext.models.hf import gdn_kernels, load_hf_model

    model = load_hf_model(ckpt, dtype="float32", device="cpu")  # strict: raises on missing keys
    assert set(gdn_kernels().values()) == {"torch"}
    _, info = AutoModelForCausalLM.from_pretrained(str(ckpt), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # per-expert tensors on disk became transformers' fused gate_up_proj in memory, in order
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    names = [f"model.layers.1.mlp.experts.5.{p}_proj.weight" for p in ("gate", "up", "down")]
    disk = {}
    for n in names:
        with safe_open(str(ckpt / index[n]), "pt") as f:
            disk[n] = f.get_tensor(n)
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[5], torch.cat([disk[names[0]], disk[names[1]]]))
    assert torch.equal(experts.down_proj[5], disk[names[2]])
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, 512) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[0].linear_attn.in_proj_qkvz.weight.grad is not None


def test_seeded_and_independent_of_layout(ckpt, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "b", overrides=SMALL, with_mtp=False, max_shard_bytes=10**9,
                                  with_tokenizer=False)
    assert len(list(other.glob("*.safetensors"))) == 1
    reseeded = write_tiny_checkpoint(tmp_path / "c", overrides=SMALL, seed=1, with_tokenizer=False)
    name = "model.layers.0.linear_attn.in_proj_qkvz.weight"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]

    def get(d, shard):
        with safe_open(str(d / shard), "pt") as f:
            return f.get_tensor(name)

    a = get(ckpt, index[name])
    assert torch.equal(a, get(other, "model-00001-of-00001.safetensors"))  # same seed: same values
    assert not torch.equal(a, get(reseeded, json.loads((reseeded / "model.safetensors.index.json").read_text())
                                  ["weight_map"][name]))
    assert abs(float(a.std()) - 0.02) < 0.002


def test_cli_refuses_a_non_empty_output(ckpt, capsys):
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", REPO / "tools/make_tiny_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir())
    with pytest.raises(SystemExit) as exc:
        mod.main(["--out", str(ckpt), "--set", "vocab_size=512"])
    assert exc.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in ckpt.iterdir()) == before


def test_refuses_a_huge_random_checkpoint(tmp_path):
    from qnext.errors import UserError

    with pytest.raises(UserError, match="GiB random checkpoint"):
        write_tiny_checkpoint(tmp_path / "big", config_path="models/qwen3_next_80b_a3b/config.json")
    assert not (tmp_path / "big").exists()


def test_torch_gdn_context_restores():
    from qnext.models import hf

    before = hf.gdn_kernels()
    with hf.torch_gdn_path():
        assert set(hf.gdn_kernels().values()) == {"torch"}
    assert hf.gdn_kernels() == before

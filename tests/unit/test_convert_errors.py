"""Bad inputs to `make convert` / `make export`: one clear message, exit 2, nothing damaged."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from qnext.convert import hf_to_megatron

from convert_fixtures import REPO, write_hf_checkpoint


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


convert_main = _tool("convert_hf_to_torch_dist")
export_main = _tool("convert_torch_dist_to_hf")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("src") / "hf", with_mtp=False)


@pytest.fixture
def hf(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "hf"))


def _digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _fails(main, argv, capsys, *fragments) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for f in fragments:
        assert f in err, f"{f!r} not in: {err}"
    return err


def _shard_of(hf: Path, tensor: str) -> Path:
    return hf / json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_missing_shard(hf, tmp_path, capsys):
    victim = _shard_of(hf, "model.layers.2.linear_attn.out_proj.weight")
    victim.unlink()
    _fails(convert_main, ["--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"], capsys,
           "missing", victim.name, "download")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(hf, tmp_path, capsys):
    victim = _shard_of(hf, "model.layers.1.self_attn.q_proj.weight")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    _fails(convert_main, ["--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"], capsys,
           "truncated", victim.name)
    assert not (tmp_path / "out").exists()


def test_wrong_model_type(hf, tmp_path, capsys):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_moe"}))
    _fails(convert_main, ["--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"], capsys,
           "model_type is 'qwen3_moe'", "qwen3_next")


def test_wrong_shape_names_the_tensor(hf, tmp_path, capsys):
    name = "model.layers.1.self_attn.o_proj.weight"
    shard = _shard_of(hf, name)
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:, :100].contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _fails(convert_main, ["--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"], capsys,
           f"tensor {name} in {shard.name} has shape [128, 100], expected [128, 128]")


def test_non_empty_output_refused_then_overwritten(hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = _digest(hf)
    _fails(convert_main, ["--hf", str(hf), "--out", str(out), "--no-progress"], capsys, "not empty", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    assert convert_main(["--hf", str(hf), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").is_file()
    assert _digest(hf) == before, "the input must not change"


def test_output_inside_input_refused(hf, capsys):
    _fails(convert_main, ["--hf", str(hf), "--out", str(hf / "mg"), "--no-progress"], capsys, "overlaps")


def test_interrupted_run_leaves_no_checkpoint(hf, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = hf_to_megatron.ShardReader.read

    def read(self, name):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(self, name)

    monkeypatch.setattr(hf_to_megatron.ShardReader, "read", read)
    with pytest.raises(SystemExit) as exc:
        convert_main(["--hf", str(hf), "--out", str(tmp_path / "out"), "--no-progress"])
    assert exc.value.code == 130
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "the partial output is removed"


def test_interrupted_overwrite_keeps_the_old_checkpoint(hf, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert convert_main(["--hf", str(hf), "--out", str(out), "--no-progress"]) == 0
    before = _digest(out)
    monkeypatch.setattr(hf_to_megatron.DcpWriter, "finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit):
        convert_main(["--hf", str(hf), "--out", str(out), "--overwrite", "--no-progress"])
    assert _digest(out) == before


def test_export_errors(hf, tmp_path, capsys):
    _fails(export_main, ["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")], capsys,
           "latest_checkpointed_iteration.txt")
    ckpt = tmp_path / "mg"
    assert convert_main(["--hf", str(hf), "--out", str(ckpt), "--no-progress"]) == 0
    shutil.rmtree(ckpt / "hf")
    _fails(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "x")], capsys, "no HF config", "--hf-meta")
    other = json.loads((hf / "config.json").read_text())
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "config.json").write_text(json.dumps({**other, "num_hidden_layers": 6, "full_attention_interval": 2}))
    _fails(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--hf-meta", str(meta)], capsys,
           "lacks decoder.layers.4")
    _fails(export_main, ["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--hf-meta", str(hf),
                         "--max-shard-size", "lots"], capsys, "not a size")
    assert not (tmp_path / "x").exists()

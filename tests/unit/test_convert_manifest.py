"""The converter's torch_dist metadata equals the golden manifest that megatron-core's own save of
the Megatron Qwen3-Next model wrote on a GPU (tests/fixtures/megatron_manifest_tiny.json):
same tensor keys, global shapes and dtypes; every object the model saves is present too."""
from __future__ import annotations

import json

import torch

from qnext.convert import convert_hf_to_torch_dist, resolve_iteration_dir
from qnext.convert.dcp_io import DcpReader

from convert_fixtures import REPO, TINY_CONFIG, write_hf_checkpoint

FIXTURE = REPO / "tests/fixtures/megatron_manifest_tiny.json"
SHARD_SEP = "/shard_"


def test_converted_tiny_checkpoint_matches_the_golden_manifest(tmp_path):
    golden = json.loads(FIXTURE.read_text())
    cfg = json.loads(TINY_CONFIG.read_text())  # the exact config the manifest was captured for
    dtype = getattr(torch, golden["provenance"]["params_dtype"])
    hf = write_hf_checkpoint(tmp_path / "hf", None, dtype=dtype, with_mtp=False, max_shard_bytes=40_000_000)
    convert_hf_to_torch_dist(hf, tmp_path / "mg", progress=False, log=None)
    reader = DcpReader(resolve_iteration_dir(tmp_path / "mg"))

    ours = {k: (list(v.size), str(v.properties.dtype).removeprefix("torch.")) for k, v in reader.tensors().items()}
    theirs = {t["key"]: (t["global_shape"], t["dtype"]) for t in golden["tensors"]}
    problems = [f"missing {k} {theirs[k]}" for k in sorted(theirs.keys() - ours.keys())]
    problems += [f"unexpected {k} {ours[k]}" for k in sorted(ours.keys() - theirs.keys())]
    problems += [f"{k}: converter {ours[k]} vs Megatron {theirs[k]}" for k in sorted(ours.keys() & theirs.keys())
                 if ours[k] != theirs[k]]
    assert not problems, "\n".join(problems)

    # megatron-core 0.19.2 keeps its common state in a "common_state" object; we write common.pt,
    # which its loader reads first (and older Megatron-LM requires).
    our_objects = {k.split(SHARD_SEP)[0] for k in reader.objects()}
    missing = sorted(set(golden["objects"]) - {"common_state"} - our_objects)
    assert not missing, f"objects Megatron saves but the converter does not write: {missing}"
    assert (resolve_iteration_dir(tmp_path / "mg") / "common.pt").is_file()
    assert json.loads((resolve_iteration_dir(tmp_path / "mg") / "metadata.json").read_text()) == golden["metadata_json"]

"""The tiny Megatron model's checkpoint layout at TP2, EP2, ETP2, PP2 and TP2xEP2, simulated on CPU.

Each layout runs as a gloo world of 2 or 4 processes; every rank builds its part of the model on
the ``meta`` device and lists the ShardedTensors its ``sharded_state_dict`` would save. Across
ranks the keys, global shapes and dtypes must equal the single-GPU golden manifest, and the main
replicas' chunks must tile every global tensor exactly once: what lets a converted checkpoint load
at any layout.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models/tiny_qwen3_next/config.json"
FIXTURE = REPO / "tests/fixtures/megatron_manifest_tiny.json"


def _worker(rank: int, world: int, port: int, layout: dict, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from qnext.megatron.config import ParallelSizes
    from qnext.megatron.model import _sharded_metadata, build_model
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device, destroy_parallel, initialize_parallel

    p = ParallelSizes(**layout)
    initialize_parallel(p, backend="gloo")
    dtype = getattr(torch, json.loads(FIXTURE.read_text())["provenance"]["params_dtype"]) if FIXTURE.exists() else torch.float32
    with construction_device("meta"):
        model = build_model(TINY, p, dtype, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))
    sd = model.sharded_state_dict(metadata=_sharded_metadata())
    apply_factories(sd)
    rows = [
        (v.key, tuple(v.global_shape), tuple(v.global_offset), tuple(v.local_shape), tuple(v.replica_id),
         str(v.dtype).removeprefix("torch."))
        for v in nested_values(sd) if isinstance(v, ShardedTensor)
    ]
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(rows))
    destroy_parallel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAYOUTS = {
    "tp2": (2, dict(tp=2)),
    "ep2": (2, dict(ep=2)),
    "etp2": (2, dict(tp=2, etp=2)),
    "pp2": (2, dict(pp=2)),
    "tp2_ep2": (4, dict(tp=2, ep=2)),
}


@pytest.mark.skipif(not FIXTURE.exists(), reason="golden manifest not captured yet")
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_tiles_the_golden_manifest(name, tmp_path):
    world, layout = LAYOUTS[name]
    mp.start_processes(_worker, args=(world, _free_port(), layout, str(tmp_path)), nprocs=world, start_method="spawn")
    rows = [r for k in range(world) for r in pickle.loads((tmp_path / f"rank{k}.pkl").read_bytes())]
    golden = {r["key"]: r for r in json.loads(FIXTURE.read_text())["tensors"]}
    seen = {}
    for key, gshape, offset, lshape, replica, dtype in rows:
        assert key in golden, f"{name}: unexpected key {key}"
        assert list(gshape) == golden[key]["global_shape"] and dtype == golden[key]["dtype"], (name, key, gshape, dtype)
        if all(r == 0 for r in replica):  # main replica: the chunk a save writes
            seen.setdefault(key, []).append((offset, lshape))
    assert set(seen) == set(golden), f"{name}: keys without a main replica {sorted(set(golden) - set(seen))[:5]}"
    for key, chunks in seen.items():
        cover = torch.zeros(golden[key]["global_shape"], dtype=torch.int16)
        for offset, lshape in chunks:
            lshape = (1,) * (len(offset) - len(lshape)) + tuple(lshape)  # prepended axes (expert) have size 1
            cover[tuple(slice(o, o + s) for o, s in zip(offset, lshape))] += 1
        assert bool((cover == 1).all()), f"{name}: {key} chunks do not tile the tensor exactly once"

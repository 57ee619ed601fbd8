"""The converted tiny checkpoint loads into the TE-free Megatron Qwen3-Next model (built on CPU)
through megatron-core's own dist_checkpointing at TP1, TP2, EP2 and PP2 (gloo ranks on CPU).

After each load every ShardedTensor of ``model.sharded_state_dict()`` (megatron's own statement of
which global region each rank's parameter holds, SwiGLU and GDN splits included) must equal that
region of the checkpoint, and TP1 must also equal the HF tensors pushed through the weight map.
Slow (two processes importing megatron): about a minute on 2 cores.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/unit"))

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

LAYOUTS = [dict(tp=2), dict(ep=2), dict(pp=2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_rank(rank: int, world: int, port: int, ckpt: str, cfg: dict, layouts: list[dict]) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, str(REPO / "src"))
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from qnext.convert.dcp_io import DcpReader
    from qnext.convert.megatron_dir import resolve_iteration_dir
    from qnext.megatron.model import _sharded_metadata, build_model, load_torch_dist
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device, initialize_parallel

    reader = DcpReader(resolve_iteration_dir(ckpt))
    for layout in layouts:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        p = initialize_parallel(layout, backend="gloo")
        with construction_device("cpu"):
            model = build_model(cfg, p, torch.float32, use_te=False, config_overrides=dict(CPU_BUILD_OVERRIDES))
        for prm in model.parameters():
            prm.data.fill_(float("nan"))  # anything the load misses stays NaN
        report = load_torch_dist(model, ckpt)
        assert not [k for k in report["not_in_checkpoint"] if not k.endswith("_extra_state")], report
        for name, prm in model.named_parameters():
            assert not torch.isnan(prm).any(), f"{layout} rank {rank}: {name} not loaded"
        sd = model.sharded_state_dict(metadata=_sharded_metadata())
        apply_factories(sd)
        checked = 0
        for st in nested_values(sd):
            if not isinstance(st, ShardedTensor):
                continue
            shape = tuple(st.data.shape)
            offset = tuple(st.global_offset)
            full = tuple(reader.tensors()[st.key].size)
            # vocab rows beyond the checkpoint (padding) are not compared
            shape = tuple(min(s, f - o) for s, f, o in zip((1,) * st.prepend_axis_num + shape, full, offset))
            want = reader.read(st.key, offset, shape)
            got = st.data.reshape((1,) * st.prepend_axis_num + tuple(st.data.shape))
            got = got[tuple(slice(0, s) for s in shape)]
            assert torch.equal(got, want), f"{layout} rank {rank}: {st.key} at {offset} differs"
            checked += 1
        assert checked > 10
        print(f"{layout} rank {rank}: {checked} sharded tensors match", flush=True)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert_fixtures import small_config, write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist

    base = tmp_path_factory.mktemp("load")
    cfg = small_config()
    hf = write_hf_checkpoint(base / "hf", cfg)
    convert_hf_to_torch_dist(hf, base / "mg", progress=False, log=None)
    return hf, base / "mg", cfg


def test_tp1_load_equals_hf_through_the_weight_map(converted):
    """In this process (a world of one): every model parameter vs the HF tensors transformed."""
    from safetensors import safe_open

    from qnext.models.qwen3_next import build_weight_map

    hf, ckpt, cfg = converted
    _check_rank(0, 1, _free_port(), str(ckpt), cfg, [dict()])
    # the checkpoint itself against HF tensors pushed through the map (what the model just loaded)
    from qnext.convert.dcp_io import DcpReader
    from qnext.convert.megatron_dir import resolve_iteration_dir

    wm = build_weight_map(cfg, mtp_layers=1)
    reader = DcpReader(resolve_iteration_dir(ckpt))
    import json

    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    for m in wm.mappings[:60]:
        ts = []
        for n in m.hf:
            with safe_open(str(hf / index[n]), "pt") as sf:
                ts.append(sf.get_tensor(n))
        for piece, t in zip(m.pieces, m.to_megatron(ts)):
            assert torch.equal(reader.read(piece.key, piece.offset, piece.shape), t), piece.key


def test_tp2_ep2_pp2_loads_match_the_checkpoint(converted):
    import torch.multiprocessing as mp

    _, ckpt, cfg = converted
    port = _free_port()
    mp.spawn(_check_rank, args=(2, port, str(ckpt), cfg, LAYOUTS), nprocs=2, join=True)

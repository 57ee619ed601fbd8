"""The converted tiny checkpoint loads into the TE-free Megatron Qwen3-Next model (built on CPU)
through megatron-core's own dist_checkpointing at TP1, TP2, EP2 and PP2 (gloo ranks on CPU).

After each load every ShardedTensor of ``model.sharded_state_dict()`` (megatron's own statement of
which global region each rank's parameter holds, SwiGLU and GDN splits included) must equal that
region of the checkpoint, and TP1 must also equal the HF tensors pushed through the weight map.
The TP2 model is then saved by megatron-core's own torch_dist save (its two CUDA calls answered for
the CPU), and that checkpoint exports back to the original HF files bit for bit.
Slow (two processes importing megatron): one to two minutes on 2 cores.
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


def _megatron_save_on_cpu(model, path: str) -> None:
    """megatron-core's own save; its strategy calls torch.cuda.synchronize/current_device."""
    from qnext.megatron.model import save_torch_dist

    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        save_torch_dist(model, path)
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


def _check_rank(rank: int, world: int, port: int, ckpt: str, cfg: dict, layouts: list[dict],
                save_tp2_to: str | None = None) -> None:
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
        if save_tp2_to and layout == dict(tp=2):
            _megatron_save_on_cpu(model, f"{save_tp2_to}/iter_0000007")
            if rank == 0:
                Path(save_tp2_to, "latest_checkpointed_iteration.txt").write_text("7")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from convert_fixtures import small_config, write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist

    base = tmp_path_factory.mktemp("load")
    cfg = small_config()
    hf = write_hf_checkpoint(base / "hf")
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


def test_tp2_ep2_pp2_loads_match_the_checkpoint_and_a_megatron_save_exports_back(converted, tmp_path):
    import torch.multiprocessing as mp

    from qnext.convert import copy_hf_meta, export_torch_dist_to_hf
    from test_convert_roundtrip import assert_bit_identical

    hf, ckpt, cfg = converted
    saved = tmp_path / "megatron_save"
    mp.spawn(_check_rank, args=(2, _free_port(), str(ckpt), cfg, LAYOUTS, str(saved)), nprocs=2, join=True)
    assert sorted(p.name for p in (saved / "iter_0000007").iterdir())[:3] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    copy_hf_meta(ckpt, saved)  # what a training run does with the converted checkpoint's hf/
    # the model has no MTP block, so its save has none: --like copies mtp.* from the original
    export_torch_dist_to_hf(saved, tmp_path / "hf", like=hf, progress=False, log=None)
    assert_bit_identical(hf, tmp_path / "hf")


def test_megatron_training_recognises_a_release_torch_dist_checkpoint(converted):
    """megatron.training's own first step of --load: tracker -> release dir -> torch_dist -> common state."""
    import types

    from megatron.core import dist_checkpointing
    from megatron.training import checkpointing

    _, ckpt, _ = converted
    args = types.SimpleNamespace(non_persistent_global_ckpt_dir=None, non_persistent_ckpt_type=None, ckpt_step=None,
                                 exit_on_missing_checkpoint=False, auto_detect_ckpt_format=True,
                                 ckpt_format="torch_dist")
    state, name, release, kind = checkpointing._load_base_checkpoint(str(ckpt), args, rank0=True)
    assert release and name == str(ckpt / "release") and kind == checkpointing.CheckpointType.GLOBAL
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
    assert dist_checkpointing.load_content_metadata(preloaded_state_dict=state)["singleton_local_shards"] is False

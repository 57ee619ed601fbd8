"""Layout invariance of one training step on CPU: the tiny Qwen3-Next (small vocabulary, fp32, torch GDN
path), the same global batch of 4 sample chats, run through ``python -m qnext.megatron.layout_check``
under torchrun (gloo) at 1 rank, TP2 (sequence parallel), EP2, ETP2, PP2 and TP2 x EP2 (4 ranks). The
loss, the gradient norm and every gradient tensor (assembled from all ranks' chunks under the
checkpoint's keys, after megatron's DDP + ``finalize_model_grads``) must agree with the 1-rank run to
float32 rounding.

Also measured: without qnext's router fix (``QNEXT_MEGATRON_FIXES=0``), megatron-core scales the router
load-balancing gradient by the TP size: TP2's router weights' aux-loss gradient is twice one rank's.

Also LoRA: adapters' A and B gradients at TP2 equal one rank's.

Slow: 9 torchrun worlds of the tiny model, about 3 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests/unit"))

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.slow

LAYOUTS = {  # name: (ranks, arguments)
    "tp2": (2, ["--tp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "etp2": (2, ["--tp", "2", "--etp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2_ep2": (4, ["--tp", "2", "--ep", "2"]),
}
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from convert_fixtures import write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist

    base = tmp_path_factory.mktemp("grad_layouts")
    hf = write_hf_checkpoint(base / "hf")
    convert_hf_to_torch_dist(hf, base / "mg", progress=False, log=None)
    return base


def run_layout(base: Path, name: str, ranks: int, extra: list[str], **env_extra: str) -> Path:
    out = base / name
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # a world of its own
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]), **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "qnext.megatron.layout_check", "--hf", str(base / "hf"), "--megatron-ckpt", str(base / "mg"),
           "--out", str(out), "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    print([line for line in proc.stdout.splitlines() if line.startswith("[layout]")])
    return out


@pytest.fixture(scope="module")
def reference(ckpt):
    return run_layout(ckpt, "one_rank", 1, [])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_gives_the_one_rank_loss_and_gradients(ckpt, reference, name):
    from qnext.megatron.layout_check import compare

    ranks, extra = LAYOUTS[name]
    out = run_layout(ckpt, name, ranks, extra)
    ref = json.loads((reference / "summary.json").read_text())
    assert ref["loss_tokens"] > 0 and ref["tensors"] > 50 and ref["grad_norm"] > 0
    [row] = compare([reference, out])
    print(row)
    assert row["tokens_equal"]
    assert row["loss_rel_diff"] < 1e-6, row
    assert row["grad_norm_rel_diff"] < 1e-6, row
    assert row["worst_tensor_rel_l2"] < 1e-3, row  # every tensor, not just the norm
    if "tp" in name:  # the weight map's replicated tensors (norms, routers): every TP rank's copy agrees
        assert row["replicas_compared"] > 0 and row["replica_max_rel_diff"] < 1e-6, row


def test_without_the_router_fix_tp2_doubles_the_router_aux_gradient(ckpt, reference):
    """What qnext.megatron.compat corrects: megatron-core alone gives TP2 router gradients whose
    load-balancing part (the difference to a run without that loss) is twice the 1-rank one."""
    broken = run_layout(ckpt, "tp2_unfixed", 2, ["--tp", "2"], QNEXT_MEGATRON_FIXES="0")
    no_aux = run_layout(ckpt, "one_rank_no_aux", 1, ["--moe-aux-loss-coeff", "0"])
    ref, bad, main = (torch.load(d / "grads.pt") for d in (reference, broken, no_aux))
    routers = [k for k in ref if k.endswith("mlp.router.weight")]
    assert routers
    for k in ref:
        diff = float((bad[k].double() - ref[k].double()).norm() / ref[k].double().norm())
        if k in routers:
            aux_ref, aux_bad = ref[k].double() - main[k].double(), bad[k].double() - main[k].double()
            assert float(aux_ref.norm()) > 0
            assert float((aux_bad - 2 * aux_ref).norm() / aux_bad.norm()) < 1e-3, k
            assert diff > 1e-2, (k, diff)
        else:  # the aux loss's gradient also reaches earlier weights through the routers' input: a small shift
            assert diff < 2e-2, (k, diff)


def test_lora_gradients_at_tp2_equal_one_ranks(ckpt):
    """LoRA (qnext.lora on megatron's parallel linears, TP-sharded A or B): with B drawn non-zero and the
    same at both layouts (``--lora-b-std``), every adapter's A and B gradient at TP2 + sequence parallelism
    equals the single rank's, as whole HF PEFT tensors."""
    from qnext.megatron.layout_check import compare

    one = run_layout(ckpt, "lora_one_rank", 1, ["--mode", "lora"])
    tp2 = run_layout(ckpt, "lora_tp2", 2, ["--mode", "lora", "--tp", "2"])
    ref = json.loads((one / "summary.json").read_text())
    a_norms = [v for k, v in ref["grad_norms"].items() if "lora_A" in k]
    assert ref["mode"] == "lora" and len(a_norms) >= 10 and min(a_norms) > 0  # A has gradients too
    [row] = compare([one, tp2])
    print(row)
    assert row["loss_rel_diff"] < 1e-6 and row["grad_norm_rel_diff"] < 1e-6, row
    assert row["worst_tensor_rel_l2"] < 1e-4, row


def test_bf16_limits_pass_rounding_and_fail_a_halved_head(ckpt, reference):
    """bf16 on CPU (megatron's torch.compile off there): TP2 against one rank passes with per-tensor limits
    measured from the same step in fp32 and with TP2's rounding at one rank (``--split-k 2``), and fails
    when one key head of one layer's GDN query gradient is halved, or one whole tensor doubled."""
    from qnext.megatron.layout_check import compare

    bf16 = ["--dtype", "bf16"]
    one = run_layout(ckpt, "bf16_one_rank", 1, bf16)
    split = run_layout(ckpt, "bf16_one_rank_split2", 1, [*bf16, "--split-k", "2"])
    tp2 = run_layout(ckpt, "bf16_tp2", 2, [*bf16, "--tp", "2"])
    s = json.loads((tp2 / "summary.json").read_text())
    assert s["dtype"] == "bf16" and s["loss"] == s["loss"]  # finite: the CPU miscompile gave NaN
    [row] = compare([one, tp2], noise=[reference, split])
    print(row)
    assert row["tokens_equal"] and row["loss_rel_diff"] < 2e-2 and row["grad_norm_rel_diff"] < 2e-2, row
    assert row["worst_excess"] <= 1.0, row  # rounding passes

    grads = torch.load(tp2 / "grads.pt")
    key = next(k for k in grads if k.endswith("layers.0.self_attention.in_proj.weight.query"))
    head_dim = json.loads((ckpt / "hf/config.json").read_text())["linear_key_head_dim"]
    for name, change in (("halved_head", lambda t: t[:head_dim].mul_(0.5)), ("doubled", lambda t: t.mul_(2.0))):
        bad = ckpt / f"bf16_tp2_{name}"
        bad.mkdir(exist_ok=True)
        broken = {k: v.clone() for k, v in grads.items()}
        change(broken[key])
        torch.save(broken, bad / "grads.pt")
        (bad / "summary.json").write_text((tp2 / "summary.json").read_text())
        [row] = compare([one, bad], noise=[reference, split])
        print(name, row["worst_excess_tensor"], row["worst_excess"])
        assert row["worst_excess"] > 1.0 and row["worst_excess_tensor"] == key, row

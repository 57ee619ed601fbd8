"""Megatron LoRA on the tiny Qwen3-Next (converted to torch_dist, run on CPU in float32) against
transformers + PEFT, at TP1 in this process and at TP2 / TP2 with sequence parallelism in two gloo
processes.

- TP1: ``apply_lora`` with random nonzero B, ``export_peft_adapter``; ``PeftModel.from_pretrained`` on
  the HF model gives the same logits and the same LoRA gradients. With the shared expert adapted too
  the reference is the HF model with the adapter merged by ``qnext.export.merge_adapter`` (PEFT 0.21
  on transformers 5 moves ``*.gate_proj``-style targets to the routed experts, see
  ``qnext.lora.peft_io``). Merged equals unmerged; a megatron torch_dist save with LoRA loads back.
- TP2 (and TP2 + sequence parallel): the same adapter loaded with ``load_peft_adapter`` gives the same
  logits, the same (gathered) LoRA gradients as TP1, exports back to the same tensors, merges to the
  same logits; its torch_dist save holds the LoRA tensors in HF layout: an adapter exported offline
  from it is the input adapter, and it loads at TP1.
Slow (imports megatron and transformers, two extra processes): about a minute on 2 cores.
"""
from __future__ import annotations

import json
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

TOKENS = dict(batch=2, seq_len=16, seed=0)
LOGITS_TOL = 1e-4  # relative L2, float32
GRAD_TOL = 1e-4
ALL = dict(r=4, alpha=8.0, shared_expert=True)  # default targets + the shared expert


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- helpers
def build(hf_dir: Path, mg_dir: Path, parallel=None):
    """The Megatron model of this rank on CPU, float32, base weights loaded (GDN torch path)."""
    from qnext.megatron.model import build_model, load_torch_dist
    from qnext.megatron.parallel import CPU_BUILD_OVERRIDES, construction_device, use_torch_gdn_path

    use_torch_gdn_path()
    cfg = json.loads((hf_dir / "config.json").read_text())
    with construction_device("cpu"):
        model = build_model(cfg, parallel, torch.float32, use_te=False,
                            config_overrides=dict(CPU_BUILD_OVERRIDES, deterministic_mode=True))
    load_torch_dist(model, mg_dir)
    return model, cfg


def tokens_for(cfg) -> torch.Tensor:
    from qnext.megatron.parity import fixed_tokens

    return fixed_tokens(TOKENS["batch"], TOKENS["seq_len"], cfg["vocab_size"], TOKENS["seed"])


def loss_weights(cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(TOKENS["batch"], TOKENS["seq_len"], cfg["vocab_size"], generator=g)


def megatron_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Gathered logits [b, s, V] with autograd (eval mode: no MoE aux loss, as in the HF reference)."""
    from qnext.megatron.parallel import construction_device

    model.eval()
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    with construction_device("cpu"), torch.enable_grad():
        return model(tokens, position_ids, None, runtime_gather_output=True)


def megatron_lora_grads(model, tokens, weights) -> dict[str, torch.Tensor]:
    """Gradients of sum(logits * weights) w.r.t. the adapters, finalised as megatron does (grads of
    factors marked ``sequence_parallel`` summed over TP), gathered into HF layout."""
    from megatron.core import parallel_state as ps

    from qnext.lora import hf_lora_tensors, lora_parameters
    from qnext.megatron.parallel import construction_device

    for p in lora_parameters(model):
        p.grad = None
    loss = (megatron_forward(model, tokens) * weights).sum()
    with construction_device("cpu"):  # megatron's collectives allocate on torch.cuda.current_device()
        loss.backward()
    for p in lora_parameters(model):
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    return hf_lora_tensors(model, grads=True)


def hf_logits(hf_dir: Path, tokens, adapter: Path | None = None, weights=None):
    """transformers' logits (float32, CPU) with a PEFT adapter; with ``weights`` also the adapter's
    gradients of sum(logits * weights), under the saved PEFT names."""
    pytest.importorskip("peft")
    from qnext.models.hf import load_hf_model

    model = load_hf_model(hf_dir, "float32", "cpu").eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=weights is not None)
    if weights is None:
        with torch.no_grad():
            return model(tokens).logits.float(), None
    logits = model(tokens).logits.float()
    (logits * weights).sum().backward()
    grads = {n.replace(".default.weight", ".weight"): p.grad for n, p in model.named_parameters() if "lora_" in n}
    return logits.detach(), grads


def write_random_adapter(out: Path, hf_config: dict, lora: dict, seed: int = 5) -> dict[str, torch.Tensor]:
    """A PEFT adapter with random A and B for every linear the LoRA config names (HF shapes)."""
    from safetensors.torch import save_file

    from qnext.config.schema import LoraConfig
    from qnext.lora.peft_io import peft_config, peft_key
    from qnext.lora.plan import layer_targets, peft_targets
    from qnext.models.qwen3_next import build_weight_map

    cfg = LoraConfig(**lora)
    wm = build_weight_map(hf_config)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(len(wm.dims.layer_types)):
        for names in layer_targets(wm, i, peft_targets(cfg)).values():
            for n in names:
                rows, cols = wm.hf_shapes[n]
                module = n[: -len(".weight")]
                tensors[peft_key(module, "A")] = (torch.rand(cfg.r, cols, generator=g) - 0.5) * 2 / cols ** 0.5
                tensors[peft_key(module, "B")] = torch.randn(rows, cfg.r, generator=g) * 0.05
    out.mkdir(parents=True)
    modules = [k[len("base_model.model."):-len(".lora_A.weight")] for k in tensors if "lora_A" in k]
    peft_config(cfg, modules).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


def megatron_save_on_cpu(model, path: Path) -> None:
    """megatron-core's own torch_dist save; its strategy calls torch.cuda.synchronize/current_device."""
    from qnext.megatron.model import save_torch_dist

    sync, current = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize, torch.cuda.current_device = (lambda *a, **k: None), (lambda: "cpu")
    try:
        save_torch_dist(model, path)
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = sync, current


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny HF checkpoint (vocab 512), its torch_dist conversion, a random adapter on every default
    target and the shared expert, and the HF model with that adapter merged (the reference)."""
    pytest.importorskip("peft")
    from convert_fixtures import write_hf_checkpoint

    from qnext.convert import convert_hf_to_torch_dist
    from qnext.export import merge_adapter

    base = tmp_path_factory.mktemp("lora")
    hf = write_hf_checkpoint(base / "hf", with_mtp=False, odd_norm=False)
    convert_hf_to_torch_dist(hf, base / "mg", progress=False, log=None)
    cfg = json.loads((hf / "config.json").read_text())
    tensors = write_random_adapter(base / "adapter_all", cfg, ALL)
    merge_adapter(hf, base / "adapter_all", base / "hf_merged")
    return dict(base=base, hf=hf, mg=base / "mg", cfg=cfg, adapter_all=base / "adapter_all", tensors=tensors,
                merged=base / "hf_merged")


def eager_megatron() -> None:
    """megatron-core wraps some fusions in torch.compile, which on CPU compiles C++ on the first call
    of every process (seconds each); eager runs the same arithmetic."""
    torch._dynamo.config.disable = True


@pytest.fixture(scope="module")
def world():
    from qnext.megatron.parallel import initialize_parallel

    before = torch._dynamo.config.disable
    eager_megatron()
    initialize_parallel(backend="gloo")
    yield
    torch._dynamo.config.disable = before


@pytest.fixture(scope="module")
def tp1_all(tiny, world):
    """TP1 reference for the adapter on every target + shared expert: logits and LoRA gradients."""
    from qnext.config.schema import LoraConfig
    from qnext.lora import apply_lora, load_peft_adapter, lora_config_from_adapter

    model, cfg = build(tiny["hf"], tiny["mg"])
    adapter_cfg = json.loads((tiny["adapter_all"] / "adapter_config.json").read_text())
    lora = lora_config_from_adapter(adapter_cfg)
    assert (lora.r, lora.alpha, lora.shared_expert) == (4, 8.0, True)
    assert sorted(lora.targets) == sorted(LoraConfig().targets)
    apply_lora(model, lora, hf_config=cfg, seed=1)
    assert load_peft_adapter(model, tiny["adapter_all"]) == len(tiny["tensors"])
    tokens = tokens_for(cfg)
    grads = megatron_lora_grads(model, tokens, loss_weights(cfg))
    logits = megatron_forward(model, tokens).detach()
    return dict(model=model, logits=logits, grads=grads, tokens=tokens)


# ---------------------------------------------------------------------------------------------- TP1
def test_tp1_lora_equals_hf_peft_from_the_exported_adapter(tiny, world, tmp_path):
    """Default targets: random nonzero B set in Megatron, exported, loaded by PeftModel: same logits
    and same LoRA gradients."""
    from qnext.config.schema import DEFAULT_LORA_TARGETS, LoraConfig
    from qnext.errors import UserError
    from qnext.lora import apply_lora, export_peft_adapter, load_peft_adapter, lora_modules, lora_parameters

    model, cfg = build(tiny["hf"], tiny["mg"])
    tokens = tokens_for(cfg)
    base = megatron_forward(model, tokens).detach()
    apply_lora(model, LoraConfig(r=4, alpha=8.0), hf_config=cfg, seed=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora." in n} and len(trainable) == 2 * 14
    assert {p.data_ptr() for p in lora_parameters(model)} == {model.get_parameter(n).data_ptr() for n in trainable}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            for br in m.lora.values():
                br.lora_B.copy_(torch.randn(br.lora_B.shape, generator=g) * 0.05)
    weights = loss_weights(cfg)
    grads = megatron_lora_grads(model, tokens, weights)
    logits = megatron_forward(model, tokens).detach()
    assert rel_l2(logits, base) > 1e-2, "the adapter should change the logits"

    out = export_peft_adapter(model, tmp_path / "adapter", base_model=tiny["hf"])
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(acfg["target_modules"]) == sorted(DEFAULT_LORA_TARGETS)
    assert (acfg["r"], acfg["lora_alpha"], acfg["peft_type"]) == (4, 8.0, "LORA")
    assert not list(tmp_path.glob(".adapter.tmp-*"))  # written through a temporary directory
    with pytest.raises(UserError, match="differ"):  # that adapter also has the shared expert
        load_peft_adapter(model, tiny["adapter_all"])

    ref, ref_grads = hf_logits(tiny["hf"], tokens, out, weights)
    err = rel_l2(logits, ref)
    assert err < LOGITS_TOL, f"Megatron+LoRA vs HF+PEFT logits: rel L2 {err:.2e}"
    assert set(ref_grads) == set(grads) and len(grads) == 2 * 14
    worst = max((rel_l2(grads[k], ref_grads[k]), k) for k in grads)
    print(f"TP1 vs HF+PEFT: logits rel L2 {err:.2e}, worst LoRA grad rel L2 {worst[0]:.2e}")
    assert worst[0] < GRAD_TOL, f"LoRA gradient vs PEFT: rel L2 {worst[0]:.2e} at {worst[1]}"


def test_tp1_shared_expert_lora_equals_the_merged_hf_model(tiny, tp1_all):
    """Every default target + the shared expert (fc1 gate/up halves, fc2): logits equal the HF model
    with the adapter merged into its weights by qnext.export."""
    ref, _ = hf_logits(tiny["merged"], tp1_all["tokens"])
    base, _ = hf_logits(tiny["hf"], tp1_all["tokens"])
    assert rel_l2(ref, base) > 1e-2
    err = rel_l2(tp1_all["logits"], ref)
    print(f"TP1 (with shared expert) vs HF merged: logits rel L2 {err:.2e}")
    assert err < LOGITS_TOL, f"Megatron+LoRA vs HF merged: rel L2 {err:.2e}"


def test_tp1_merge_unmerge_and_torch_dist_round_trip(tiny, tp1_all, tmp_path):
    from qnext.config.schema import LoraConfig
    from qnext.lora import apply_lora, hf_lora_tensors, merge_lora, unmerge_lora
    from qnext.megatron.model import load_torch_dist

    model, tokens, unmerged = tp1_all["model"], tp1_all["tokens"], tp1_all["logits"]
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora." not in n}
    assert merge_lora(model) == 16
    merged = megatron_forward(model, tokens).detach()
    assert rel_l2(merged, unmerged) < 1e-5, rel_l2(merged, unmerged)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        if ".lora." not in n:
            torch.testing.assert_close(p.detach(), weights_before[n], rtol=0, atol=1e-6)
    assert rel_l2(megatron_forward(model, tokens).detach(), unmerged) < 1e-6

    # megatron's torch_dist save of base + LoRA, loaded into a fresh model with other LoRA values
    megatron_save_on_cpu(model, tmp_path / "ckpt")
    fresh, cfg = build(tiny["hf"], tiny["mg"])
    apply_lora(fresh, LoraConfig(**ALL), hf_config=cfg, seed=99)
    load_torch_dist(fresh, tmp_path / "ckpt")
    got = hf_lora_tensors(fresh)
    assert set(got) == set(tiny["tensors"])
    for k, t in tiny["tensors"].items():
        assert torch.equal(got[k], t), k


# ---------------------------------------------------------------------------------------------- TP2
def _tp2_worker(rank: int, world: int, port: int, paths: dict, out_dir: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    eager_megatron()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, str(REPO / "src"))
    from megatron.core import parallel_state as ps

    from qnext.lora import (apply_lora, export_peft_adapter, hf_lora_tensors, load_peft_adapter,
                            lora_config_from_adapter, merge_lora)
    from qnext.megatron.config import ParallelSizes
    from qnext.megatron.parallel import initialize_parallel

    # megatron's embedding forks its CUDA RNG tracker with sequence parallelism (for dropout, which is
    # zero here); there is no CUDA RNG on this machine, so the fork does nothing
    import contextlib

    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    hf, mg, adapter = Path(paths["hf"]), Path(paths["mg"]), Path(paths["adapter"])
    results = {}
    for name, sp in (("tp2", False), ("tp2_sp", True)):
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        p = ParallelSizes(tp=2, sequence_parallel=sp)
        initialize_parallel(p, backend="gloo")
        model, cfg = build(hf, mg, p)
        assert model.config.sequence_parallel == sp
        apply_lora(model, lora_config_from_adapter(json.loads((adapter / "adapter_config.json").read_text())),
                   hf_config=cfg, seed=7)
        load_peft_adapter(model, adapter)
        tokens = tokens_for(cfg)
        grads = megatron_lora_grads(model, tokens, loss_weights(cfg))
        logits = megatron_forward(model, tokens).detach()
        exported = export_peft_adapter(model, Path(out_dir) / f"adapter_{name}")
        params = hf_lora_tensors(model)
        merge_lora(model)
        merged = megatron_forward(model, tokens).detach()
        if not sp:
            from qnext.lora import unmerge_lora

            unmerge_lora(model)
            megatron_save_on_cpu(model, Path(out_dir) / "ckpt_tp2")
        if rank == 0:
            results[name] = dict(logits=logits, merged=merged, grads=grads, params=params,
                                 exported=str(exported))
    if rank == 0:
        torch.save(results, Path(out_dir) / "tp2.pt")
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def test_tp2_and_sequence_parallel_equal_tp1(tiny, tp1_all, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from qnext.config.schema import LoraConfig
    from qnext.lora import apply_lora, export_adapter_from_checkpoint, hf_lora_tensors
    from qnext.megatron.model import load_torch_dist

    paths = {"hf": str(tiny["hf"]), "mg": str(tiny["mg"]), "adapter": str(tiny["adapter_all"])}
    mp.start_processes(_tp2_worker, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2, start_method="spawn")
    results = torch.load(tmp_path / "tp2.pt")
    ref, _ = hf_logits(tiny["merged"], tp1_all["tokens"])
    for name, r in results.items():
        err = rel_l2(r["logits"], ref)
        assert err < LOGITS_TOL, f"{name}: Megatron+LoRA vs HF merged: rel L2 {err:.2e}"
        assert rel_l2(r["logits"], tp1_all["logits"]) < LOGITS_TOL
        assert rel_l2(r["merged"], r["logits"]) < 1e-5, name
        assert set(r["grads"]) == set(tp1_all["grads"])
        worst = max((rel_l2(r["grads"][k], tp1_all["grads"][k]), k) for k in r["grads"])
        print(f"{name}: logits vs HF merged rel L2 {err:.2e}, merged vs unmerged "
              f"{rel_l2(r['merged'], r['logits']):.2e}, worst LoRA grad vs TP1 {worst[0]:.2e}")
        assert worst[0] < GRAD_TOL, f"{name}: LoRA gradient vs TP1: rel L2 {worst[0]:.2e} at {worst[1]}"
        exported = load_file(str(Path(r["exported"]) / "adapter_model.safetensors"))
        for k, t in tiny["tensors"].items():
            assert torch.equal(r["params"][k], t) and torch.equal(exported[k], t), f"{name}: {k}"

    # the TP2 torch_dist save (base + LoRA): its LoRA tensors are the adapter's, read offline ...
    adapter = export_adapter_from_checkpoint(tmp_path / "ckpt_tp2", tmp_path / "adapter_offline", LoraConfig(**ALL))
    offline = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(offline) == set(tiny["tensors"]) and all(torch.equal(offline[k], t) for k, t in tiny["tensors"].items())
    # ... and loaded at TP1
    fresh, cfg = build(tiny["hf"], tiny["mg"])
    apply_lora(fresh, LoraConfig(**ALL), hf_config=cfg, seed=99)
    load_torch_dist(fresh, tmp_path / "ckpt_tp2")
    got = hf_lora_tensors(fresh)
    for k, t in tiny["tensors"].items():
        assert torch.equal(got[k], t), k
    assert rel_l2(megatron_forward(fresh, tp1_all["tokens"]).detach(), tp1_all["logits"]) < 1e-6


def _megatron_run_dir(root: Path, ckpt: Path, mode: str) -> Path:
    """A Megatron run's output directory as qnext.megatron.train leaves it (run.json, config.yaml,
    checkpoints/ with the tracker), holding ``ckpt`` as its iteration 3."""
    import shutil

    from qnext.config.load import load_config, to_yaml

    run = root / f"run_{mode}"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, run / "checkpoints/iter_0000003")
    (run / "checkpoints/latest_checkpointed_iteration.txt").write_text("3")
    (run / "run.json").write_text(json.dumps({"backend": "megatron", "checkpoint": str(ckpt)}))
    cfg = load_config([f"train={mode}", *(f"train.lora.{k}={str(v).lower()}" for k, v in ALL.items())])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def test_export_cli_reads_a_megatron_lora_run(tiny, world, tmp_path):
    """``tools/export_hf.py --run <megatron run>``: the adapter from its newest torch_dist checkpoint,
    and with --base the merged HF checkpoint; clear errors without --base and for a full run."""
    import subprocess

    from safetensors.torch import load_file

    from qnext.export import main as export_main

    from qnext.config.schema import LoraConfig
    from qnext.lora import apply_lora, load_peft_adapter

    model, cfg = build(tiny["hf"], tiny["mg"])  # base + the random adapter, saved by megatron-core
    apply_lora(model, LoraConfig(**ALL), hf_config=cfg, seed=3)
    load_peft_adapter(model, tiny["adapter_all"])
    ckpt = tmp_path / "ckpt"
    megatron_save_on_cpu(model, ckpt)
    run = _megatron_run_dir(tmp_path, ckpt, "lora")
    assert export_main(["--run", str(run), "--adapter-out", str(tmp_path / "a"), "--merged-out",
                        str(tmp_path / "m"), "--base", str(tiny["hf"])]) == 0
    got = load_file(str(tmp_path / "a/adapter_model.safetensors"))
    assert set(got) == set(tiny["tensors"]) and all(torch.equal(got[k], t) for k, t in tiny["tensors"].items())
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert cfg["r"] == ALL["r"] and cfg["lora_alpha"] == ALL["alpha"]
    ref = {}
    for f in sorted(Path(tiny["merged"]).glob("*.safetensors")):
        ref.update(load_file(str(f)))
    out = {}
    for f in sorted((tmp_path / "m").glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert set(out) == set(ref) and all(torch.equal(out[k], ref[k]) for k in ref)

    cmd = [sys.executable, str(REPO / "tools/export_hf.py"), "--run", str(run), "--merged-out", str(tmp_path / "m2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2 and "--base" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "m2").exists()
    full = _megatron_run_dir(tmp_path, ckpt, "full")
    proc = subprocess.run([*cmd[:3], str(full), "--adapter-out", str(tmp_path / "a2")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2 and "make export" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    (full / "config.yaml").write_text("train: [unclosed\n")
    proc = subprocess.run([*cmd[:3], str(full), "--adapter-out", str(tmp_path / "a3")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert proc.returncode == 2 and "config.yaml" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

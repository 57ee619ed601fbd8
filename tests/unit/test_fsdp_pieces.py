"""Fast checks of the FSDP backend's pure pieces: data order, LR schedule, output-dir decisions,
metrics files, eval scoring, LoRA delta math of the streaming export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qnext.config import load_config
from qnext.errors import UserError
from qnext.eval import EvalPrompt, contains_answer, load_eval_prompts, score
from qnext.export import lora_deltas, ondisk_value
from qnext.fsdp.optim import lr_at
from qnext.fsdp.sampler import GlobalBatchSampler
from qnext.fsdp.prepare import plan_output_dir
from qnext.metrics import MetricsLogger, read_metrics


def test_sampler_same_micro_batches_for_1_and_2_ranks():
    one = GlobalBatchSampler(37, micro_batch=2, accum=2, world_size=1, rank=0, seed=5)
    r0 = GlobalBatchSampler(37, micro_batch=2, accum=1, world_size=2, rank=0, seed=5)
    r1 = GlobalBatchSampler(37, micro_batch=2, accum=1, world_size=2, rank=1, seed=5)
    for step in range(30):  # crosses several epochs
        assert one.micro_batches(step) == r0.micro_batches(step) + r1.micro_batches(step)
        assert sorted(one.global_indices(step)) == sorted(sum(one.micro_batches(step), []))


def test_sampler_epochs_are_permutations():
    s = GlobalBatchSampler(12, micro_batch=3, accum=1, world_size=1, rank=0, seed=0)
    first_epoch = sum((s.global_indices(i) for i in range(4)), [])
    second_epoch = sum((s.global_indices(i) for i in range(4, 8)), [])
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(12))
    assert first_epoch != second_epoch


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = load_config(["train.steps=20", "train.warmup_steps=4", "train.lr=1e-3", "train.min_lr=1e-4"]).train
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[0] == pytest.approx(2.5e-4) and lrs[3] == pytest.approx(1e-3)
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def _cfg(out: Path, *extra: str):
    return load_config([f"output_dir={out}", *extra])


def test_output_dir_decisions(tmp_path):
    out = tmp_path / "run"
    assert plan_output_dir(_cfg(out)).resume_from is None  # missing: fresh
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    with pytest.raises(UserError, match="not empty"):
        plan_output_dir(_cfg(out))
    plan = plan_output_dir(_cfg(out, "overwrite=true"))
    assert plan.clear and (out / "notes.txt").exists()  # deciding deletes nothing
    # a run of ours with a complete checkpoint resumes; a temporary one is ignored
    (out / "notes.txt").unlink()
    (out / "run.json").write_text("{}")
    (out / "checkpoints/.step_0000004.tmp").mkdir(parents=True)
    ck = out / "checkpoints/step_0000002"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2}))
    plan = plan_output_dir(_cfg(out))
    assert plan.resume_from == ck and not plan.clear
    with pytest.raises(UserError, match="resume=never"):
        plan_output_dir(_cfg(out, "resume=never"))
    with pytest.raises(UserError, match="not a training checkpoint"):
        plan_output_dir(_cfg(out, f"resume={tmp_path}"))


def test_metrics_jsonl_png_and_resume_truncation(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, wandb="false", total_steps=4, progress_bar=False) as m:
        for step in range(1, 5):
            m.log(step, {"loss": 5.0 - step, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 10.0,
                         "peak_mem_gib": 0.5, "step_time_s": 0.1}, echo=False)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[0]["loss"] == 4.0
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    # resuming from step 2 drops the records of steps 3 and 4
    m = MetricsLogger(tmp_path, tensorboard=False, wandb="false", progress_bar=False, start_step=2)
    m.log(3, {"loss": 0.5}, echo=False)
    m.close(plot=False)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_answer_contained_scoring(tmp_path):
    assert contains_answer("You were born on  January 1,\n2058.", "january 1, 2058")
    assert not contains_answer("January 2, 2058", "January 1, 2058")
    prompts = [EvalPrompt("a?", "x", "trained"), EvalPrompt("b?", "y", "heldout")]
    res = score(prompts, ["it is x", "z"])
    assert res["correct"] == 1 and res["by_kind"]["trained"]["accuracy"] == 1.0
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UserError, match=r"p.jsonl:2"):
        load_eval_prompts(bad)


def test_lora_delta_matches_peft_merge():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(6, 5, bias=False))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(peft_model)
    cfg = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=list))
    base = model.proj.base_layer.weight.detach().clone()
    deltas = lora_deltas(cfg, weights)
    merged = peft_model.merge_and_unload()
    assert torch.equal(base + deltas["proj.weight"], merged.proj.weight)


def test_ondisk_value_splits_fused_experts():
    gate_up = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # 2 experts, I=3, H=3
    down = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    sd = {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down}
    assert torch.equal(ondisk_value("model.layers.0.mlp.experts.1.gate_proj.weight", sd), gate_up[1, :3])
    assert torch.equal(ondisk_value("model.layers.0.mlp.experts.1.up_proj.weight", sd), gate_up[1, 3:])
    assert torch.equal(ondisk_value("model.layers.0.mlp.experts.0.down_proj.weight", sd), down[0])
    assert ondisk_value("mtp.fc.weight", sd) is None


def test_fsdp_optimizer_is_fused_adamw_by_default_and_matches_foreach():
    """train.optimizer_fused (default true) gives torch's fused AdamW, which takes the same steps as the
    foreach one to float32 rounding; false keeps torch's default."""
    import torch

    from qnext.config.schema import TrainConfig
    from qnext.fsdp.optim import build_optimizer

    def three_steps(fused: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
        opt = build_optimizer(model.parameters(), TrainConfig(lr=1e-2, optimizer_fused=fused))
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        return opt, torch.cat([p.detach().flatten() for p in model.parameters()])

    opt_fused, w_fused = three_steps(True)
    opt_plain, w_plain = three_steps(False)
    assert all(g.get("fused") for g in opt_fused.param_groups)
    assert not any(g.get("fused") for g in opt_plain.param_groups)
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-5, atol=1e-6)


def test_fsdp_wraps_only_to_shard_or_cast():
    """Several ranks: always FSDP. One GPU: only when FSDP's mixed precision has to cast the stored weights
    (full training keeps float32 masters, computes in bf16); a bf16 LoRA base on one GPU is not wrapped (FSDP2
    would copy every layer at each all-gather). One CPU process: never."""
    from qnext.fsdp.parallelize import needs_fsdp

    bf16, fp32 = torch.bfloat16, torch.float32
    assert needs_fsdp(2, "cuda", bf16, "bf16") and needs_fsdp(8, "cuda", fp32, "bf16") and needs_fsdp(2, "cpu", fp32, "fp32")
    assert needs_fsdp(1, "cuda", fp32, "bf16")  # full training on one GPU: the cast is FSDP's policy
    assert not needs_fsdp(1, "cuda", bf16, "bf16")  # LoRA on one GPU
    assert not needs_fsdp(1, "cuda", fp32, "fp32")
    assert not needs_fsdp(1, "cpu", fp32, "fp32")

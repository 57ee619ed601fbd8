"""CPU-testable pieces of the Megatron training entry: micro-batches in Megatron's convention (shifted
labels, loss mask on labelled positions only, packed chats kept apart), the held-out split over
ranks, the loss reduction, FLOPs/MFU, checkpoint directories, the start-up checks, the LoRA hook
and the CPU refusal of the entry itself."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qnext.data.dataset import IGNORE_INDEX
from qnext.errors import UserError

REPO = Path(__file__).resolve().parents[2]
PAD = 151643


def sample(ids, labelled, seq_lens=None):
    """A data-module sample: ``labelled`` marks positions whose own token is an assistant token."""
    positions = []
    for n in seq_lens or [len(ids)]:
        positions += list(range(n))
    return {"input_ids": list(ids), "labels": [t if m else IGNORE_INDEX for t, m in zip(ids, labelled)],
            "position_ids": positions, "seq_lens": list(seq_lens or [len(ids)])}


# ------------------------------------------------------------------------------------ batches
def test_labels_shift_left_and_the_mask_marks_labelled_next_tokens():
    from qnext.megatron.data import megatron_batch

    s = sample([10, 11, 12, 13, 14], [0, 0, 1, 1, 0])
    b = megatron_batch([s], PAD, 8, pack=False)
    assert b["tokens"].tolist() == [[10, 11, 12, 13, 14, PAD, PAD, PAD]]
    assert b["labels"].tolist() == [[11, 12, 13, 14, PAD, PAD, PAD, PAD]]
    # position t predicts token t+1: the loss counts where token t+1 is labelled (12 and 13)
    assert b["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0]]
    assert b["padding_mask"].tolist() == [[False] * 5 + [True] * 3]
    assert b["chat_lengths"] == [5] and "cu_seqlens" not in b


def test_packed_chats_never_score_across_the_boundary():
    from qnext.megatron.data import megatron_batch

    # chat B's first token is labelled here on purpose: the loss must still not cross from A into B
    s = sample([1, 2, 3, 4, 5, 6, 7], [0, 1, 1, 1, 0, 1, 1], seq_lens=[3, 4])
    b = megatron_batch([s], PAD, 10, pack=True)
    assert b["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 0, 0]]
    assert b["cu_seqlens"].tolist() == [0, 3, 7, 10] and b["max_seqlen"] == 4
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]
    assert b["chat_lengths"] == [3, 4]
    # two packed rows: one thd row, the second row's chats and padding after the first's
    two = megatron_batch([s, s], PAD, 10, pack=True)
    assert two["tokens"].shape == (1, 20) and two["cu_seqlens"].tolist() == [0, 3, 7, 10, 13, 17, 20]
    assert two["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 0, 0] * 2]
    assert two["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2] * 2]
    assert two["chat_lengths"] == [3, 4, 3, 4]
    # a held-out round padded with -1 (no loss): only that row's half of the thd row is masked
    from qnext.megatron.data import eval_micro_batch

    ev = eval_micro_batch([s], [0, -1], PAD, 10, pack=True)
    assert ev["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 0, 0] + [0] * 10]
    with pytest.raises(ValueError, match="more than seq_length"):
        megatron_batch([s], PAD, 6, pack=True)


def test_loss_mask_count_equals_the_data_modules_labelled_tokens():
    from qnext.data.dataset import build_datasets
    from qnext.data.tokenizer import load_tokenizer
    from qnext.megatron.data import megatron_batch

    tok = load_tokenizer(None)
    for pack in (False, True):
        train, _, stats = build_datasets(REPO / "data/sample/chats.jsonl", tok, 384, pack=pack, valid_fraction=0.05)
        got = sum(float(megatron_batch([s], tok.pad_token_id, 384, pack)["loss_mask"].sum()) for s in train)
        assert got == stats.train.loss_tokens > 0


def test_loss_func_sums_labelled_tokens_and_reports_the_count():
    from qnext.megatron.data import loss_func, reduce_report

    per_token = torch.tensor([[2.0, 3.0, 5.0, 7.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    loss, n, report = loss_func(mask, per_token)
    assert float(loss) == 8.0 and int(n) == 2 and report["lm loss"].tolist() == [8.0, 2.0]
    total = reduce_report([report, {"lm loss": torch.tensor([1.0, 1.0])}])
    assert total.tolist() == [9.0, 3.0] and reduce_report([]) is None


def test_eval_rounds_cover_every_sample_once_and_match_across_ranks():
    from qnext.megatron.data import eval_batches

    n, mb, dp = 11, 2, 3
    per_rank = [eval_batches(list(range(n)), mb, dp, r, 0) for r in range(dp)]
    assert len({len(x) for x in per_rank}) == 1  # same number of forward passes on every rank
    seen = sorted(i for rank in per_rank for group in rank for i in group if i >= 0)
    assert seen == list(range(n))
    assert all(len(g) == mb for rank in per_rank for g in rank)
    assert len(eval_batches(list(range(n)), mb, dp, 0, 1)) == 1  # train.eval_batches limits the rounds


# ------------------------------------------------------------------------------------ FLOPs / MFU
def test_flops_of_qwen3_next_80b():
    from qnext.throughput import attention_flops, forward_flops_per_token, step_flops

    cfg = json.loads((REPO / "models/qwen3_next_80b_a3b/config.json").read_text())
    per_token = forward_flops_per_token(cfg)
    # ~3B active parameters per token (+ the 0.31B LM head): 2 FLOPs per parameter
    assert 2 * 3.3e9 < per_token < 2 * 3.8e9, per_token / 2e9
    # causal attention over chats: quadratic in each chat, not in the packed row
    assert attention_flops(cfg, [4096]) > 3.9 * attention_flops(cfg, [2048, 2048]) / 2
    assert attention_flops(cfg, [1]) == 4.0 * 12 * 16 * 256
    full, lora = step_flops(cfg, [1000, 3096], lora=False), step_flops(cfg, [1000, 3096], lora=True)
    assert full / lora == pytest.approx(1.5)


def test_peak_table_and_mfu(monkeypatch):
    from qnext.throughput import PEAK_ENV, mfu, peak_tflops

    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops("NVIDIA H200") == 989.4 and peak_tflops("NVIDIA H200 NVL") == 835.5
    assert peak_tflops("Some Future GPU") is None and mfu(100.0, None) is None
    assert mfu(494.7, "NVIDIA H100 80GB HBM3") == pytest.approx(0.5)
    monkeypatch.setenv(PEAK_ENV, "200")
    assert mfu(50.0, "Some Future GPU") == 0.25


# ------------------------------------------------------------------------------------ checkpoints
def test_pretrained_root_and_pruning(tmp_path):
    from qnext.megatron.checkpoint import TRACKER_FILE, iteration_dir, pretrained_root, prune_checkpoints

    root = tmp_path / "conv"
    (root / "release").mkdir(parents=True)
    (root / "release/.metadata").write_text("")
    with pytest.raises(UserError, match="not a Megatron torch_dist checkpoint"):
        pretrained_root(root)
    (root / TRACKER_FILE).write_text("release")
    assert pretrained_root(root) == root and iteration_dir(root) == root / "release"
    with pytest.raises(UserError) as err:
        pretrained_root(root / "release")
    assert str(root) in err.value.hint

    run = tmp_path / "ckpts"
    for i in (2, 4, 6, 8):
        (run / f"iter_{i:07d}").mkdir(parents=True)
    (run / TRACKER_FILE).write_text("8")
    removed = prune_checkpoints(run, keep=2)
    assert sorted(p.name for p in removed) == ["iter_0000002", "iter_0000004"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["iter_0000006", "iter_0000008"]


# ------------------------------------------------------------------------------------ start-up checks
def _converted_like(tmp_path: Path, config: Path) -> Path:
    root = tmp_path / "conv"
    (root / "release").mkdir(parents=True)
    (root / "release/.metadata").write_text("")
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    (root / "hf").mkdir()
    (root / "hf/config.json").write_text(config.read_text())
    return root


def test_prepare_needs_a_converted_checkpoint_of_the_same_model(tmp_path):
    from qnext.megatron.prepare import prepare

    base = ["recipe=qwen3_next_80b_lora", f"output_dir={tmp_path}/run"]
    with pytest.raises(UserError, match="model.megatron_checkpoint is not set"):
        prepare(base, world_size=8, use_te=False)
    tiny = _converted_like(tmp_path, REPO / "models/tiny_qwen3_next/config.json")
    with pytest.raises(UserError, match="converted from a model other than"):
        prepare(base + [f"model.megatron_checkpoint={tiny}"], world_size=8, use_te=False)
    with pytest.raises(UserError, match="parallel.backend=fsdp"):
        prepare(["recipe=tiny_lora_cpu"], world_size=1)


def test_prepare_resolves_and_guards_the_output_dir(tmp_path):
    from qnext.megatron.prepare import prepare
    from qnext.rundir import RUN_MARKER

    conv = _converted_like(tmp_path / "c", REPO / "models/qwen3_next_80b_a3b/config.json")
    run = tmp_path / "run"
    base = ["recipe=qwen3_next_80b_lora", f"output_dir={run}", f"model.megatron_checkpoint={conv}"]
    prep = prepare(base, world_size=8, use_te=False)
    assert not prep.ckpt.resuming and prep.ckpt.pretrained == str(conv) and not prep.clear_output
    assert prep.argv[prep.argv.index("--pretrained-checkpoint") + 1] == str(conv)
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no qnext run"):
        prepare(base, world_size=8, use_te=False)
    assert prepare(base + ["overwrite=true"], world_size=8, use_te=False).clear_output
    (run / RUN_MARKER).write_text("{}")
    (run / "checkpoints").mkdir()
    (run / "checkpoints/latest_checkpointed_iteration.txt").write_text("100")
    resumed = prepare(base, world_size=8, use_te=False)
    assert resumed.ckpt.resuming and "--pretrained-checkpoint" not in resumed.argv
    with pytest.raises(UserError, match="resume=never"):
        prepare(base + ["resume=never"], world_size=8, use_te=False)


def test_lora_hook_without_the_lora_module_is_a_clear_error(monkeypatch):
    from qnext.config import load_config
    from qnext.megatron.provider import attach_lora

    monkeypatch.setitem(sys.modules, "qnext.lora", None)  # as in a checkout without qnext/lora
    with pytest.raises(UserError) as err:
        attach_lora(torch.nn.Linear(2, 2), load_config(["recipe=qwen3_next_80b_lora"]), {})
    assert "train.mode=lora" in err.value.message and "qnext.lora.apply_lora" in err.value.message
    assert "train.mode=full" in err.value.hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_entry_refuses_cpu_before_any_process_group(tmp_path):
    conv = _converted_like(tmp_path, REPO / "models/tiny_qwen3_next/config.json")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), WORLD_SIZE="1", RANK="0")
    proc = subprocess.run([sys.executable, "-m", "qnext.megatron.train", "model=tiny_qwen3_next", "parallel=1gpu",
                           "data=sample", "train=full", "train.warmup_steps=1", f"model.megatron_checkpoint={conv}",
                           f"output_dir={tmp_path}/run"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "the Megatron backend needs CUDA GPUs" in proc.stderr, proc.stderr
    assert "run-fsdp.sh" in proc.stderr and not (tmp_path / "run").exists()


def test_metrics_go_to_the_writers_megatron_opened(tmp_path):
    """The Megatron backend hands megatron's own TensorBoard writer to the shared metrics logger."""
    from torch.utils.tensorboard import SummaryWriter

    from qnext.metrics import MetricsLogger, format_record, read_metrics

    writer = SummaryWriter(log_dir=str(tmp_path / "tensorboard"))
    log = MetricsLogger(tmp_path, tensorboard=False, wandb="false", tensorboard_writer=writer, progress_bar=False)
    rec = {"loss": 2.5, "grad_norm": 1.0, "lr": 1e-4, "tokens_per_s": 1000.0, "tflops_per_device": 400.0, "mfu": 0.4}
    log.log(1, rec)
    log.close(plot=False)
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["mfu"] == 0.4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "MFU 40.0%" in format_record({"step": 1, **rec})


class _Wrapper:  # a megatron optimizer's shape: .optimizer is the torch one (chained: .chained_optimizers)
    def __init__(self, opt):
        self.optimizer = opt


def test_primed_adam_state_is_what_the_first_step_creates_and_has_one_step():
    """Resume without Apex/TE: megatron's DistributedOptimizer.state_dict reads one ``step`` from
    every parameter's torch Adam state, which a fresh optimizer lacks. Primed states must give it
    one step value, and training from them must equal training from a fresh optimizer."""
    from qnext.megatron.compat.adam_resume import prime_adam_states

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    grads = [torch.randn_like(p) for p in params]
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    primed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_fresh = torch.optim.AdamW(fresh, lr=1e-2, weight_decay=0.1)
    opt_primed = torch.optim.AdamW(primed, lr=1e-2, weight_decay=0.1)

    chained = type("Chained", (), {"chained_optimizers": [_Wrapper(opt_primed)]})()
    assert prime_adam_states(chained) == 2
    assert prime_adam_states(chained) == 0  # already primed: nothing touched
    state = opt_primed.state_dict()["state"]
    assert len({s["step"].item() for s in state.values()}) == 1  # megatron's assertion holds

    for _ in range(3):
        for ps, opt in ((fresh, opt_fresh), (primed, opt_primed)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(fresh, primed):
        assert torch.equal(a, b)
    assert opt_primed.state_dict()["state"][0]["step"].item() == 3


def run(params, opt, steps):
    """Adam steps with the given gradients (one list of per-parameter gradients per step)."""
    for g in steps:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()


def test_adam_resumed_with_one_shared_step_tensor_is_repaired():
    """What megatron-core's DistributedOptimizer.load_state_dict (no Apex/TE) leaves behind: one step
    tensor in every parameter's torch Adam state. torch increments it once per parameter per step, so
    the updates after a resume differ from the uninterrupted run's; ``unshare_adam_steps`` restores
    them exactly."""
    from qnext.megatron.compat.adam_resume import unshare_adam_steps

    torch.manual_seed(0)
    init = [torch.randn(4, 3), torch.randn(5), torch.randn(2, 2)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    run(ref, ref_opt, grads)  # uninterrupted: 6 steps

    def resumed(repair: bool):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)
        run(ps, opt, grads[:3])
        saved = opt.state_dict()
        new = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt2 = torch.optim.AdamW(new, lr=1e-2, weight_decay=0.1)
        shared = torch.tensor(3.0)  # megatron: step = torch.tensor(steps[0]); s["step"] = step for every s
        state = {i: dict(s, step=shared) for i, s in saved["state"].items()}
        opt2.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        if repair:
            assert unshare_adam_steps(_Wrapper(opt2)) == 2
            assert unshare_adam_steps(_Wrapper(opt2)) == 0
        run(new, opt2, grads[3:])
        return new, opt2

    broken, broken_opt = resumed(repair=False)
    assert broken_opt.state_dict()["state"][0]["step"].item() == 3 + 3 * 3  # advanced once per parameter
    assert not all(torch.equal(a, b) for a, b in zip(broken, ref))
    fixed, fixed_opt = resumed(repair=True)
    assert all(torch.equal(a, b) for a, b in zip(fixed, ref))
    assert {s["step"].item() for s in fixed_opt.state_dict()["state"].values()} == {6.0}


def test_adam_resumed_with_a_wrong_step_count_is_repaired_from_the_iteration():
    """A resume whose Adam states hold the wrong ``step`` (0, as a primed fresh optimizer has) takes a
    larger step than the uninterrupted run (bias correction of step 1); ``restore_adam_steps`` sets it
    from the checkpoint's iteration and the resumed run equals the uninterrupted one bit for bit."""
    from qnext.megatron.compat.adam_resume import adam_state_report, restore_adam_steps

    torch.manual_seed(1)
    init = [torch.randn(4, 3), torch.randn(5)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(6)]

    ref = [torch.nn.Parameter(p.clone()) for p in init]
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95))
    run(ref, ref_opt, grads)

    def resumed(repair: bool):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95))
        run(ps, opt, grads[:3])
        saved = opt.state_dict()
        new = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt2 = torch.optim.AdamW(new, lr=1e-2, betas=(0.9, 0.95))
        opt2.load_state_dict({"state": {i: dict(s, step=torch.tensor(0.0)) for i, s in saved["state"].items()},
                              "param_groups": saved["param_groups"]})
        report = adam_state_report(_Wrapper(opt2))
        assert report["steps"] == [0.0] and report["exp_avg_abs_mean"] > 0
        if repair:
            assert restore_adam_steps(_Wrapper(opt2), 3) == 2
            assert restore_adam_steps(_Wrapper(opt2), 3) == 0
            assert adam_state_report(_Wrapper(opt2))["steps"] == [3.0]
        run(new, opt2, grads[3:])
        return new

    assert not all(torch.equal(a, b) for a, b in zip(resumed(repair=False), ref))
    assert all(torch.equal(a, b) for a, b in zip(resumed(repair=True), ref))


def test_checkpoints_are_written_when_asked_and_only_then():
    from qnext.megatron.checkpoint import should_save

    saved = lambda **k: [s for s in range(1, 8) if should_save(s, k.get("stop", 7), 7, k["every"], k["final"])]  # noqa: E731
    assert saved(every=0, final=False) == []  # the benchmark's setting: no checkpoint at all
    assert saved(every=0, final=True) == [7]
    assert saved(every=3, final=False) == [3, 6]
    assert saved(every=3, final=True) == [3, 6, 7]
    assert saved(every=0, final=False, stop=4) == [4]  # stop_after: the checkpoint to resume from


def test_disk_check_refuses_a_disk_that_cannot_hold_one_checkpoint():
    from qnext.megatron.checkpoint import checkpoint_bytes, disk_check

    gib = 1024**3
    # the 4-layer real-width proxy, full training: 7.21e9 bf16 weights + fp32 main copy and two moments
    need = checkpoint_bytes(int(7.21e9) * 2, int(7.21e9))
    assert need == int(7.21e9) * 14
    assert checkpoint_bytes(100, 10, with_optimizer=False) == 100
    with pytest.raises(UserError) as err:
        disk_check(need, 40 * gib, keep=2, where="/ckpt")
    assert "/ckpt has 40.0 GiB free" in str(err.value) and "train.save_every=0" in str(err.value)
    note = disk_check(need, 120 * gib, keep=2, where="/ckpt")
    assert note is not None and "keeping 2" in note
    assert disk_check(need, 400 * gib, keep=2, where="/ckpt") is None
    with pytest.raises(UserError):  # the boundary: one byte short of one checkpoint
        disk_check(need, need - 1, keep=0, where="/ckpt")
    assert "fits" in disk_check(need, need, keep=0, where="/ckpt")  # exactly one fits, the next write would not


def test_host_loss_token_count_matches_the_loss_mask_of_packed_and_padded_rows():
    """The folded 1/N (qnext.megatron.token_scale) needs, on the host, exactly the count of positions the
    loss mask of megatron_batch marks: not a label at the first token of a packed chat, none in padding."""
    from qnext.megatron.data import megatron_batch
    from qnext.megatron.token_scale import global_loss_tokens, loss_token_count

    ig = -100
    packed = {"input_ids": list(range(10)), "labels": [ig, 1, 2, ig, 4, 5, 6, 7, ig, 9],
              "position_ids": [0, 1, 2, 0, 1, 2, 3, 0, 1, 2], "seq_lens": [3, 4, 3]}
    packed_first_labelled = {**packed, "labels": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}  # chat starts carry labels
    plain = {"input_ids": [5, 6, 7, 8], "labels": [5, ig, 7, 8], "position_ids": [0, 1, 2, 3]}
    for s, pack in ((packed, True), (packed_first_labelled, True), (plain, False)):
        mask = megatron_batch([s], 0, 12, pack=pack)["loss_mask"]
        assert loss_token_count(s) == int(mask.sum()), s
    assert loss_token_count(packed_first_labelled) == 7  # 10 labels minus the three chat starts
    assert global_loss_tokens([packed, plain]) == loss_token_count(packed) + loss_token_count(plain) == 6 + 2


def test_overwrite_keeps_megatrons_tensorboard_writer_alive(tmp_path):
    """Repeating a run into its output_dir with overwrite=true: megatron's writers are opened after the
    directory is cleared (qnext.megatron.writers, in the entry's order: args, globals, clear, writers), so
    the event file the writer holds is the one left in the directory. Opened before the clear, the file was
    deleted under the writer and its first flush ended the run (seen on an H200)."""
    from megatron.training import global_vars

    from qnext.megatron.args import TENSORBOARD_SUBDIR, parse_megatron_args
    from qnext.megatron.prepare import prepare
    from qnext.megatron.writers import defer_writers, open_writers
    from qnext.rundir import RUN_MARKER, start_run_dir

    conv = _converted_like(tmp_path / "c", REPO / "models/qwen3_next_80b_a3b/config.json")
    run = tmp_path / "run"
    (run / TENSORBOARD_SUBDIR).mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}")
    (run / TENSORBOARD_SUBDIR / "events.out.tfevents.old").write_text("an earlier run")
    prep = prepare(["recipe=qwen3_next_80b_lora", f"output_dir={run}", f"model.megatron_checkpoint={conv}",
                    "overwrite=true", "logging.tensorboard=true"], world_size=8, use_te=False)
    assert prep.clear_output
    args = parse_megatron_args(prep.argv, world_size=8, rank=7)  # the last rank holds the writers
    assert args.tensorboard_dir == str(run / TENSORBOARD_SUBDIR)
    saved = defer_writers(args)
    global_vars.set_global_variables(args, build_tokenizer=False)
    try:
        assert global_vars.get_tensorboard_writer() is None  # nothing open while the directory is cleared
        start_run_dir(run, prep.clear_output, "megatron")
        assert not (run / TENSORBOARD_SUBDIR).exists()
        open_writers(args, saved)
        writer = global_vars.get_tensorboard_writer()
        assert writer is not None and args.tensorboard_dir == str(run / TENSORBOARD_SUBDIR)
        writer.add_scalar("loss", 1.0, 1)
        writer.flush()
        events = list((run / TENSORBOARD_SUBDIR).glob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].name != "events.out.tfevents.old" and events[0].stat().st_size > 0
        writer.close()
    finally:
        global_vars.destroy_global_vars()

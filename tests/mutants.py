"""Mutation check of the CPU suite: does a green ``make test`` mean what the README says?

Each mutation below is one small, named bug of the kind that trains silently wrong (a swapped norm,
unshifted labels, a dropped optimizer repair, a packing boundary one token off ...). For each, the
repository is copied to a scratch directory, the bug is put into the copy by a literal string
replacement, and the CPU tests that claim to catch it run there. A mutation is *killed* when those
tests fail; one that *survives* is a hole in the suite. The source tree itself is never touched.

    make mutants                      # all of them (about 10 minutes on 2 cores)
    make mutants ARGS="--only lora_scale_doubled,unshifted_labels_fsdp"
    make mutants ARGS="--list"

Exit status 0 only when every mutation is killed. A mutation whose text is no longer in the file
is an error (the list must follow the code), not a pass.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", ".whl", "runs", "outputs", "__pycache__", "*.pyc",
                                     ".pytest_cache", "results", "*.egg-info")


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug, in words
    path: str  # file relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (literal text, exactly once in the file; its replacement)
    tests: tuple[str, ...]  # pytest node ids (relative to the repository root) that must fail


FSDP_PACKING = "tests/integration/test_fsdp_packing.py"
MEGATRON_VS_HF = "tests/integration/test_megatron_lora_tp.py::test_tp1_lora_equals_hf_peft_from_the_exported_adapter"
RESUME = "tests/integration/test_megatron_optimizer_resume_cpu.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "packed_boundaries_ignored", "FSDP: transformers' GDN and short conv run across packed chats (as shipped)",
        "src/qnext/models/hf_packed.py",
        (("        if not is_packed_binding(fn):\n            setattr(mod, name, cls(name, fn))",
          "        if False:\n            setattr(mod, name, cls(name, fn))"),),
        (f"{FSDP_PACKING}::test_packed_rows_equal_each_chat_alone",),
    ),
    Mutation(
        "packing_boundary_off_by_one", "FSDP: each chat's first token counted in the previous chat's segment",
        "src/qnext/models/hf_packed.py",
        (("cu_seqlens.to(device=device, dtype=torch.long)[1:], right=True)",
          "cu_seqlens.to(device=device, dtype=torch.long)[1:], right=False)"),),
        (f"{FSDP_PACKING}::test_varlen_conv_equals_conv1d_per_segment",
         f"{FSDP_PACKING}::test_packed_rows_equal_each_chat_alone"),
    ),
    Mutation(
        "packed_loss_crosses_boundary", "Megatron: a chat's last token is scored against the next chat's first",
        "src/qnext/megatron/data.py",
        (("((labels[:, 1:] != IGNORE_INDEX) & (positions[:, 1:] != 0))", "(labels[:, 1:] != IGNORE_INDEX)"),),
        ("tests/unit/test_megatron_train_pieces.py::test_packed_chats_never_score_across_the_boundary",),
    ),
    Mutation(
        "packed_eval_pad_masks_wrong_row", "Megatron: a held-out round's padding row of a packed micro-batch keeps "
        "its loss (the mask indexed as if rows were not concatenated)",
        "src/qnext/megatron/data.py",
        (('    mask = batch["loss_mask"].view(len(ix), seq_length)', '    mask = batch["loss_mask"]'),),
        ("tests/unit/test_megatron_train_pieces.py::test_packed_chats_never_score_across_the_boundary",),
    ),
    Mutation(
        "unshifted_labels_fsdp", "FSDP: the loss scores position t against token t instead of t+1",
        "src/qnext/fsdp/model.py",
        (("        target = labels[:, 1:]\n", "        target = labels[:, :-1]\n"),),
        (f"{FSDP_PACKING}::test_packed_rows_equal_each_chat_alone",),
    ),
    Mutation(
        "unshifted_labels_megatron", "Megatron: the target at t is token t instead of t+1",
        "src/qnext/megatron/data.py",
        (("    target[:, :-1] = ids[:, 1:]\n", "    target[:, :] = ids\n"),),
        ("tests/integration/test_megatron_forward_step.py::"
         "test_reported_loss_is_the_sum_over_labelled_tokens_and_grads_flow",),
    ),
    Mutation(
        "qk_norm_swapped", "conversion: HF q_norm goes to Megatron's k_layernorm and k_norm to q_layernorm",
        "src/qnext/models/qwen3_next.py",
        (('"{hf}.self_attn.q_norm.weight", "{mg}.self_attention.q_layernorm.weight"',
          '"{hf}.self_attn.q_norm.weight", "{mg}.self_attention.k_layernorm.weight"'),
         ('"{hf}.self_attn.k_norm.weight", "{mg}.self_attention.k_layernorm.weight"',
          '"{hf}.self_attn.k_norm.weight", "{mg}.self_attention.q_layernorm.weight"')),
        (MEGATRON_VS_HF,),
    ),
    Mutation(
        "norm_shift_sign", "conversion: the GDN output norm stored as 1 - w (and read back as 1 - w), not w - 1",
        "src/qnext/models/weight_map.py",
        (("        return [(w.float() - 1.0).to(w.dtype)]", "        return [(1.0 - w.float()).to(w.dtype)]"),
         ("        return [(w.float() + 1.0).to(w.dtype)]", "        return [(1.0 - w.float()).to(w.dtype)]")),
        (MEGATRON_VS_HF,),
    ),
    Mutation(
        "expert_fc1_transposed", "Megatron: the routed experts' fc1 weight used transposed (square in the tiny model)",
        "src/qnext/megatron/experts.py",
        (("        h = self._project(self.linear_fc1, x, counts, offsets, self.fuse_wgrad)",
          "        h = grouped_linear(x, self.linear_fc1.weight.transpose(-2, -1), counts, offsets)"),),
        ("tests/unit/test_megatron_model.py::test_grouped_experts_equal_sequential_on_cpu", MEGATRON_VS_HF),
    ),
    Mutation(
        "adam_prime_dropped", "Megatron resume: torch Adam's state not primed before megatron's load",
        "src/qnext/megatron/compat/adam_resume.py",
        (("    if resuming and optimizer is not None:\n        prime_adam_states(optimizer)\n", ""),),
        (f"{RESUME}::test_resume_is_exact_with_the_repairs",),
    ),
    Mutation(
        "adam_step_restore_dropped", "Megatron resume: Adam's step counts left as megatron's load leaves them",
        "src/qnext/megatron/compat/adam_resume.py",
        (("            changed = restore_adam_steps(optimizer, iteration)", "            changed = 0"),),
        (f"{RESUME}::test_resume_is_exact_with_the_repairs",),
    ),
    Mutation(
        "lora_scale_doubled", "LoRA's update scaled by 2*alpha/r instead of alpha/r",
        "src/qnext/lora/layers.py",
        (("    module.lora_scale = float(alpha) / r\n", "    module.lora_scale = 2 * float(alpha) / r\n"),),
        (MEGATRON_VS_HF,),
    ),
    Mutation(
        "moe_combine_unsorted", "Megatron: the sorted dispatcher sums expert outputs in expert order, not back per token",
        "src/qnext/megatron/dispatch.py",
        (("    return back.view(-1, k, h).sum(dim=1)",
          "    return rows.view(-1, k, h).sum(dim=1)"),),
        ("tests/unit/test_moe_dispatch.py::test_sorted_dispatcher_equals_megatrons",),
    ),
    Mutation(
        "router_split_tp", "weight map: the router weight said to be split over tensor parallelism",
        "src/qnext/models/qwen3_next.py",
        (('    Rule.of("moe", "{hf}.mlp.gate.weight", "{mg}.mlp.router.weight", split=REPLICATED),',
          '    Rule.of("moe", "{hf}.mlp.gate.weight", "{mg}.mlp.router.weight"),'),),
        ("tests/unit/test_weight_map_splits.py::test_every_rule_split_matches_megatrons_parameter",),
    ),
    Mutation(
        "resume_never_restarts_a_run", "run directory: resume=never quietly starts over in a directory holding a run",
        "src/qnext/rundir.py",
        (('    if cfg.resume == "never":', '    if False:'),),
        ("tests/unit/test_run_directory.py::test_both_backends_decide_alike",),
    ),
    Mutation(
        "bf16_limits_too_loose", "layout check: bf16 limits ten times the measured rounding noise",
        "src/qnext/megatron/layout_check.py",
        (("limits[k] = max(limits.get(k, floor), 2 * _rel(r, other[k]))",
          "limits[k] = max(limits.get(k, floor), 20 * _rel(r, other[k]))"),),
        ("tests/integration/test_megatron_grad_layouts.py::test_bf16_limits_pass_rounding_and_fail_a_halved_head",),
    ),
)


def apply(mutation: Mutation, root: Path) -> None:
    path = root / mutation.path
    text = path.read_text()
    for old, new in mutation.edits:
        count = text.count(old)
        if count != 1:
            raise LookupError(f"{mutation.name}: the text to mutate occurs {count} times in {mutation.path} "
                              f"(expected once); update tests/mutants.py to follow the code")
        text = text.replace(old, new)
    path.write_text(text)


def run_tests(root: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root / "src")  # the mutated copy, ahead of the editable install
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu", *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [proc.stderr.strip()[-300:]]
    return proc.returncode, tail[0]


def check(mutation: Mutation, timeout: int) -> dict:
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(REPO, root, ignore=COPY_IGNORE, symlinks=True)
        try:
            apply(mutation, root)
        except LookupError as err:
            return {"name": mutation.name, "verdict": "error", "detail": str(err), "seconds": 0.0}
        rc, tail = run_tests(root, mutation.tests, timeout)
    # pytest: 1 = tests failed (killed), 0 = all passed (survived), anything else = could not run them;
    # a test that errors in its set-up proves nothing about the mutation
    verdict = {0: "SURVIVED", 1: "killed"}.get(rc, "error")
    if verdict == "killed" and (" error" in tail or "failed" not in tail):
        verdict = "error"
    return {"name": mutation.name, "verdict": verdict, "detail": tail, "seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutation names")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    chosen = list(MUTATIONS)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {m.name for m in MUTATIONS})
        if unknown:
            print(f"error: unknown mutation(s) {', '.join(unknown)}; --list shows them", file=sys.stderr)
            return 2
        chosen = [m for m in MUTATIONS if m.name in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.name:32s} {m.what}\n{'':32s} {m.path}; caught by {', '.join(m.tests)}")
        return 0
    results = []
    for i, m in enumerate(chosen, 1):
        print(f"[mutants] {i}/{len(chosen)} {m.name}: {m.what} ...", flush=True)
        res = check(m, args.timeout)
        results.append(res)
        print(f"[mutants]   {res['verdict']} after {res['seconds']} s ({res['detail']})", flush=True)
    killed = sum(r["verdict"] == "killed" for r in results)
    print(f"\n{'mutation':32s} verdict")
    for r in results:
        print(f"{r['name']:32s} {r['verdict']}")
    print(f"[mutants] {killed}/{len(results)} killed")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())

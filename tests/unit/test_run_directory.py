"""One run-directory policy for both backends (``qnext.rundir``): the same cases, run through each
backend's own decision function with its own checkpoint format, must give the same outcome."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qnext.config import load_config
from qnext.errors import UserError
from qnext.rundir import RUN_MARKER, find_tokenizer, start_run_dir

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ the two backends
def _fsdp_decide(out: Path, *extra: str):
    from qnext.fsdp.prepare import plan_output_dir

    plan = plan_output_dir(load_config([f"output_dir={out}", *extra]))
    return ("resume" if plan.resume_from is not None else "fresh"), plan.clear


def _fsdp_checkpoint(out: Path) -> None:
    ck = out / "checkpoints/step_0000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2}))


def _megatron_decide(out: Path, *extra: str):
    from qnext.megatron.checkpoint import checkpoint_plan
    from qnext.megatron.prepare import plan_output_dir

    cfg = load_config(["recipe=qwen3_next_80b_lora", f"output_dir={out}", *extra])
    ckpt = checkpoint_plan(cfg)
    clear = plan_output_dir(cfg, ckpt)
    return ("resume" if ckpt.resuming else "fresh"), clear


def _megatron_checkpoint(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/latest_checkpointed_iteration.txt").write_text("100")


BACKENDS = {"fsdp": (_fsdp_decide, _fsdp_checkpoint), "megatron": (_megatron_decide, _megatron_checkpoint)}


def _state(root: Path, state: str, make_checkpoint) -> Path:
    out = root / "run"
    if state == "missing":
        return out
    out.mkdir()
    if state == "foreign":
        (out / "notes.txt").write_text("someone else's")
    elif state in ("ours_with_checkpoint", "ours_without_checkpoint"):
        (out / RUN_MARKER).write_text("{}")
        (out / "metrics.jsonl").write_text("{}\n")
        if state == "ours_with_checkpoint":
            make_checkpoint(out)
    return out


# state, extra overrides -> expected outcome: (start, clear) or the error's words
CASES = [
    ("missing", (), ("fresh", False)),
    ("empty", (), ("fresh", False)),
    ("empty", ("resume=never",), ("fresh", False)),
    ("foreign", (), "holds no qnext run"),
    ("foreign", ("resume=never",), "holds no qnext run"),
    ("foreign", ("overwrite=true",), ("fresh", True)),
    ("ours_with_checkpoint", (), ("resume", False)),
    ("ours_with_checkpoint", ("resume=never",), "resume=never"),
    ("ours_with_checkpoint", ("overwrite=true",), ("fresh", True)),
    ("ours_without_checkpoint", (), ("fresh", True)),
    ("ours_without_checkpoint", ("resume=never",), "resume=never"),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("state,extra,expect", CASES, ids=[f"{s}{'+' + ','.join(e) if e else ''}" for s, e, _ in CASES])
def test_both_backends_decide_alike(tmp_path, backend, state, extra, expect):
    decide, make_checkpoint = BACKENDS[backend]
    out = _state(tmp_path, state, make_checkpoint)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    if isinstance(expect, str):
        with pytest.raises(UserError, match=expect):
            decide(out, *extra)
    else:
        assert decide(out, *extra) == expect
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else None) == before  # deciding changes nothing


def test_starting_clears_only_when_planned_and_keeps_the_marker(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert start_run_dir(out, True, "fsdp") == ["old.txt"]
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["backend"] == "fsdp" and not (out / "old.txt").exists()
    (out / "metrics.jsonl").write_text("{}\n")
    assert start_run_dir(out, False, "megatron") == []
    assert json.loads((out / RUN_MARKER).read_text()) == marker  # a resumed run stays the same run
    assert (out / "metrics.jsonl").exists()


def test_tokenizer_lookup_order(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "tokenizer_config.json").write_text("{}")
    assert find_tokenizer(load_config([]), [None, a, b]) == b
    assert find_tokenizer(load_config([]), [a]) is None
    assert find_tokenizer(load_config([f"model.tokenizer={a}"]), [b]) == a

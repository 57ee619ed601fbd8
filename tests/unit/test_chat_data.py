"""Chat data: loss mask on assistant spans, bad files -> file:line, split, truncation, packing, collate."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qnext.data.chat import encode_chat, encode_prompt
from qnext.data.collate import collate
from qnext.data.dataset import IGNORE_INDEX, build_datasets, pack_samples, split_chats
from qnext.data.jsonl import read_chat_jsonl
from qnext.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests/data/bad"
SAMPLE = REPO / "data/sample"


@pytest.fixture(scope="module")
def tok():
    from qnext.data.tokenizer import load_tokenizer

    return load_tokenizer()


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What day was I born?"},
    {"role": "assistant", "content": "January 1, 2058"},
    {"role": "user", "content": "And my pet's name?"},
    {"role": "assistant", "content": "Biscuit, a ferret."},
]


def test_ids_are_the_template_tokenized(tok):
    ids, mask = encode_chat(CHAT, tok)
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(mask) == len(ids)
    assert encode_prompt(CHAT[:2], tok) == tok(tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True),
                                                add_special_tokens=False)["input_ids"]


def test_loss_mask_is_exactly_the_assistant_replies(tok):
    ids, mask = encode_chat(CHAT, tok)
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r) for r in runs] == ["January 1, 2058<|im_end|>", "Biscuit, a ferret.<|im_end|>"]
    # the role header right before each reply carries no loss
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for start in (k for k in range(len(ids)) if ids[k:k + len(header)] == header):
        assert not any(mask[start:start + len(header)])
    assert sum(mask) == sum(len(r) for r in runs)


@pytest.mark.parametrize("name,line,words", [
    ("malformed_json.jsonl", 3, "malformed JSON"),
    ("missing_messages.jsonl", 2, "missing 'messages'"),
    ("no_assistant.jsonl", 3, "no assistant turn"),
    ("messages_not_list.jsonl", 1, "must be a list"),
    ("bad_role.jsonl", 2, "role 'human'"),
])
def test_bad_files_name_file_and_line(name, line, words):
    path = BAD / name
    with pytest.raises(UserError) as err:
        read_chat_jsonl(path)
    assert f"{path}:{line}:" in err.value.message and words in err.value.message
    assert err.value.hint


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_chat_jsonl(tmp_path / "none.jsonl")


def _chats(n: int, offset: int = 0) -> list:
    return [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(offset, offset + n)]


def test_split_is_deterministic_disjoint_and_stable_when_the_file_grows():
    chats = _chats(400)
    train, valid = split_chats(chats, 0.1, seed=0)
    assert (train, valid) == split_chats(chats, 0.1, seed=0)
    key = lambda c: c[0]["content"]  # noqa: E731
    assert not {key(c) for c in train} & {key(c) for c in valid}
    assert len(train) + len(valid) == 400 and 20 < len(valid) < 60
    assert {key(c) for c in split_chats(chats, 0.1, seed=1)[1]} != {key(c) for c in valid}
    grown_train, grown_valid = split_chats(chats[::-1] + _chats(200, offset=400), 0.1, seed=0)
    assert {key(c) for c in valid} == {key(c) for c in grown_valid if int(key(c)[1:]) < 400}
    assert {key(c) for c in train} <= {key(c) for c in grown_train}


def test_split_checks_fraction():
    with pytest.raises(UserError, match="valid_fraction"):
        split_chats(_chats(3), 1.0, seed=0)


def _fake(n: int, tag: int) -> dict:
    return {"input_ids": [tag] * n, "labels": [tag] * (n - 1) + [IGNORE_INDEX], "position_ids": list(range(n)),
            "seq_lens": [n]}


def test_packing_keeps_boundaries():
    lengths = [50, 7, 33, 64, 1, 20, 20, 40, 63, 2, 30]
    samples = [_fake(n, tag=k + 1) for k, n in enumerate(lengths)]
    packed = pack_samples(samples, 64)
    assert packed == pack_samples(samples, 64)  # deterministic
    assert len(packed) < len(samples) and sum(lengths) <= 64 * len(packed)
    seen = []
    for s in packed:
        n = len(s["input_ids"])
        assert n <= 64 and sum(s["seq_lens"]) == n == len(s["labels"]) == len(s["position_ids"])
        start = 0
        for length in s["seq_lens"]:
            seg = slice(start, start + length)
            assert s["position_ids"][seg] == list(range(length))  # restart at each chat
            tags = set(s["input_ids"][seg])
            assert len(tags) == 1 and s["input_ids"][seg] == samples[tags.pop() - 1]["input_ids"]
            seen.append(s["input_ids"][start])
            start += length
    assert sorted(seen) == list(range(1, len(lengths) + 1))  # every chat exactly once


def test_build_datasets_on_the_sample(tok):
    kw = dict(seq_length=256, valid_fraction=0.05, seed=0)
    train, valid, stats = build_datasets(SAMPLE / "chats.jsonl", tok, pack=False, **kw)
    ptrain, pvalid, pstats = build_datasets(SAMPLE / "chats.jsonl", tok, pack=True, **kw)
    assert stats.chats_read == 380 and stats.train.chats + stats.valid.chats == 380 and stats.valid.chats > 0
    assert stats.overlong == 0 and stats.train.loss_tokens > 0
    for s in train:  # unpacked: one chat per sample, loss never on the first token (<|im_start|>)
        assert s["seq_lens"] == [len(s["input_ids"])] and s["labels"][0] == IGNORE_INDEX
        assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(s["labels"], s["input_ids"]))
    # packing changes the grouping, not the content
    assert (pstats.train.tokens, pstats.train.loss_tokens) == (stats.train.tokens, stats.train.loss_tokens)
    assert pstats.train.sequences < stats.train.sequences and pstats.train.fill > 0.9
    assert sorted(n for s in ptrain for n in s["seq_lens"]) == sorted(len(s["input_ids"]) for s in train)
    again = build_datasets(SAMPLE / "chats.jsonl", tok, pack=True, **kw)
    assert again[0] == ptrain and again[1] == pvalid
    assert "380 chats" in stats.summary()


def test_overlong_truncated_or_dropped_and_counted(tok):
    path = BAD / "overlong.jsonl"
    train, _, st = build_datasets(path, tok, seq_length=64, pack=False, valid_fraction=0.0, overlong="truncate")
    # line 2 (long question, short answer): the cut leaves nothing to learn -> dropped; line 3 (long answer) -> cut
    assert (st.overlong, st.truncated, st.dropped, st.train.chats) == (2, 1, 1, 3)
    assert max(len(s["input_ids"]) for s in train) == 64
    _, _, st = build_datasets(path, tok, seq_length=64, pack=False, valid_fraction=0.0, overlong="drop")
    assert (st.overlong, st.truncated, st.dropped, st.train.chats) == (2, 0, 2, 2)
    assert "2 chats longer than seq_length" in st.summary()
    with pytest.raises(UserError, match="overlong"):
        build_datasets(path, tok, seq_length=64, overlong="cut")


def test_valid_path_skips_the_split(tok):
    train, valid, st = build_datasets(SAMPLE / "chats.jsonl", tok, seq_length=256, valid_fraction=0.5,
                                      valid_path=BAD / "overlong.jsonl")
    assert st.train.chats == 380 and st.valid.chats == 3


def test_collate_pads_and_marks_segments():
    a, b, c = _fake(5, 1), _fake(3, 2), _fake(4, 3)
    packed = {k: a[k] + b[k] for k in a}
    batch = collate([packed, c], pad_id=0)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [3, 3, 3, 3, 0, 0, 0, 0]
    assert batch["labels"][1, 3:].tolist() == [IGNORE_INDEX] * 5
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 12, 16] and batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["max_seqlen"]) == 5
    tensors = {k: torch.tensor(v) for k, v in c.items()}  # 1-D LongTensors work too
    assert collate([tensors], pad_id=0)["input_ids"].tolist() == [[3, 3, 3, 3]]


def test_sample_data_is_what_the_generator_writes(tmp_path):
    from qnext.data.sample import FACTS, make_eval_prompts, read_eval_prompts, write_sample_data

    paths = write_sample_data(tmp_path, seed=0)
    for name in ("chats.jsonl", "eval_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), f"run tools/make_sample_data.py ({name})"
    rows = read_eval_prompts(paths["eval_prompts"])
    assert rows == make_eval_prompts() and len({r["fact"] for r in rows}) == len(FACTS) >= 20
    asked = {m["content"] for chat in read_chat_jsonl(paths["chats"]) for m in chat if m["role"] == "user"}
    for r in rows:
        assert (r["prompt"] in asked) == (r["kind"] == "trained")  # held-out phrasings never trained on
    assert any(r["prompt"] == "What day was I born?" and r["answer"] == "January 1, 2058" for r in rows)
    lines = [json.loads(x) for x in (SAMPLE / "chats.jsonl").read_text().splitlines()]
    assert sum(len(x["messages"]) > 3 for x in lines) >= 50 and any(x["messages"][0]["role"] == "system" for x in lines)

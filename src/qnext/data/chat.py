"""One chat -> token ids + loss mask, through the tokenizer's own chat template.

The whole conversation is rendered once and tokenized once (exactly the ids the model sees at
inference), then the loss mask is read off the rendered text: in ChatML every assistant turn is
``<|im_start|>assistant\\n{reply}<|im_end|>``, and the mask is 1 on the tokens that start inside
``{reply}<|im_end|>`` -- the reply and its end marker, never the role header or the newline after
the marker. Templates that add text inside the turn (Qwen3's ``<think>`` block) are covered too:
whatever the template puts between header and ``<|im_end|>`` is what the model must produce.
"""
from __future__ import annotations

import re

_ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)


def assistant_char_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of every assistant reply (incl. its ``<|im_end|>``) in ChatML text."""
    return [m.span(1) for m in _ASSISTANT_TURN.finditer(text)]


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and a 0/1 loss mask (1 on assistant replies and their ``<|im_end|>``)."""
    text = render_chat(messages, tokenizer)
    spans = assistant_char_spans(text)
    n_assistant = sum(m["role"] == "assistant" for m in messages)
    if len(spans) != n_assistant:
        raise ValueError(
            f"the chat template rendered {len(spans)} ChatML assistant turns for {n_assistant} assistant messages; "
            "only ChatML (<|im_start|>role ... <|im_end|>) templates are supported"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [0] * len(ids)
    k = 0
    for i, (start, _end) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= start:
            mask[i] = 1
    return ids, mask


def encode_prompt(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of a chat prefix followed by the generation prompt (``<|im_start|>assistant\\n``)."""
    text = render_chat(messages, tokenizer, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])

"""Truncation of over-long texts by tokens, as NIM's and vLLM's embeddings APIs offer it (``truncate``).

The original BGE-VL models do not truncate: a text over the model's limit fails inside them. So the default is
``NONE``, which refuses such an item in one line; ``END`` drops tokens from the end of its text and ``START``
from the start until the *whole item* fits: its prompt, instruction and image tokens count against the limit
too, and are never cut (the embedding is read from the prompt's last token). The family's preprocessor says
how long each item is (``Preprocessor.text_lengths``); the cut itself is family-independent: at token
boundaries of the model's own tokenizer (its character offsets), re-measured until the item fits, since a text
cut at a boundary can tokenize a token longer at its new edge.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from bgevl.core.errors import InputError
from bgevl.core.preprocessing import counting_tokenizer

NONE, END, START = "NONE", "END", "START"
TRUNCATE_MODES = (NONE, END, START)

#: a text cut once may re-tokenize a token or two longer at its new edge; each pass cuts at least one token
_MAX_PASSES = 8

#: (tokens of the item as the model counts them, the model's limit for it), or None for an item without text
Length = Optional[tuple[int, int]]


def check_mode(mode: Any) -> str:
    """A ``truncate`` value, refused in one line unless it is one of ``TRUNCATE_MODES`` (any case)."""
    if isinstance(mode, str) and mode.upper() in TRUNCATE_MODES:
        return mode.upper()
    raise InputError(f"truncate: {mode!r} is not one of {', '.join(TRUNCATE_MODES)}", field="truncate")


def truncate_texts(texts: Sequence[Any], mode: str, lengths: Callable[[list[Any]], Sequence[Length]], tokenizer: Any,
                   start: int = 0) -> list[Any]:
    """``texts`` with every item that ``lengths`` (a list of texts -> one :data:`Length` per item) finds over its
    limit cut by ``mode`` (``END``, ``START``), or refused in one line (``NONE``)."""
    mode = check_mode(mode)
    texts = list(texts)
    for _ in range(_MAX_PASSES):
        over = [(i, length[0], length[1]) for i, length in enumerate(lengths(texts))
                if length is not None and length[0] > length[1]]
        if not over:
            return texts
        for i, tokens, limit in over:
            if mode == NONE:
                raise InputError.of_item("text", start + i, f"{tokens} tokens with its prompt, over the model's limit "
                                                            f"of {limit}; shorten it or send truncate END or START")
            texts[i] = cut_tokens(tokenizer, texts[i], tokens - limit, mode, start + i, limit)
    raise InputError.of_item("text", start + over[0][0], f"still over the limit of {over[0][2]} tokens after "
                                                         f"{_MAX_PASSES} cuts; shorten it")


def cut_tokens(tokenizer: Any, text: str, count: int, mode: str, index: int, limit: int) -> str:
    """``text`` without its last (``END``) or first (``START``) ``count`` tokens of ``tokenizer`` (a transformers
    fast tokenizer: its Rust tokenizer gives character offsets), cut at a token boundary and stripped of the spaces
    there."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise InputError(f"truncate: this model's tokenizer ({type(tokenizer).__name__}) gives no token offsets; "
                         f"send truncate NONE and shorter texts", field="truncate")
    encoding = counting_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    offsets = [span for span in encoding.offsets if span[1] > span[0]]
    if count >= len(offsets):
        raise InputError.of_item("text", index, f"the item is over the model's limit of {limit} tokens without any of "
                                                f"its text (its prompt and image tokens fill it); truncation cannot "
                                                f"make it fit: send a smaller image or no instruction")
    if mode == END:  # keep the tokens that start before the first one dropped
        cut = text[:offsets[len(offsets) - count][0]].rstrip()
    else:  # drop through the last token dropped (a SentencePiece word's "▁" and first piece share a start)
        last_dropped = offsets[count - 1][0]
        cut = text[next((s for s, _ in offsets[count:] if s > last_dropped), len(text)):].lstrip()
    if not cut:
        raise InputError.of_item("text", index, f"nothing of the text is left once cut to the model's limit of {limit} "
                                                f"tokens; truncation cannot make it fit")
    return cut

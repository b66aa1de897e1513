"""The torch pieces of a decoder embedder's language graph: its attention mask and its pooling."""

from __future__ import annotations

import torch


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, from the mask: right for left padding
    (always the final position) and right padding (the row's length - 1)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device, dtype=attention_mask.dtype)
    return torch.argmax(positions[None, :] * attention_mask, dim=1)


def causal_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype, sliding_window: int | None = None) -> torch.Tensor:
    """Additive [batch, 1, seq, seq] mask of a decoder embedder: causal, padding keys hidden, a sliding window
    when the config has one. Built here rather than by transformers' mask helpers so that every query row
    keeps its own position: a padding query then never has a fully masked softmax row (NaN in fp16 builds,
    which would leak into real tokens through padding values). Real tokens never attend to padding, so their
    results are unchanged."""
    seq = attention_mask.shape[1]
    q = torch.arange(seq, device=attention_mask.device)[:, None]
    k = torch.arange(seq, device=attention_mask.device)[None, :]
    allowed = (k <= q)[None, None] & (attention_mask[:, None, None, :] > 0)
    if sliding_window:
        allowed = allowed & ((q - k) < sliding_window)[None, None]
    allowed = allowed | (q == k)[None, None]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)

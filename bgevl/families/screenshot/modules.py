"""PyTorch modules that define the exported Qwen2.5-VL embedder graphs (BGE-VL-Screenshot).

* ``ScreenshotVision``: one or more images' patches in window order (``layout.image_layout``) -> patch embedding
  -> the vision blocks -> the 2x2 patch merger, with the image's 2-D rotary positions and its attention segments
  as inputs. Attention stays inside a window in the windowed blocks and inside an image in the full-attention
  blocks (``fullatt_block_indexes``): the masks are built in the graph by comparing segment ids (representax's
  way; optimum-intel feeds N x N masks instead), so one graph serves any grid. transformers runs each segment
  as a separate attention call by a Python loop over ``cu_seqlens``, which a graph cannot hold; the masked
  attention here computes the same thing.
* ``ScreenshotLanguage``: token ids + image features (placed by ``image_feature_index``) + the 3-D M-RoPE
  positions -> the Qwen2.5 decoder with its final RMSNorm -> the last non-padding token -> L2 normalize. No LM head.

The reference (``bgevl.families.screenshot.reference``) is transformers' own ``Qwen2_5_VLModel`` forward.
"""

from __future__ import annotations

from typing import Any

import torch

from bgevl.families.decoder.modules import causal_padding_bias, last_token_positions


def _segment_bias(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, N, N] mask: 0 where two patches share a segment, the dtype's minimum elsewhere."""
    same = segments[:, None] == segments[None, :]
    zero = torch.zeros((), dtype=dtype, device=segments.device)
    return torch.where(same, zero, torch.finfo(dtype).min)[None, None]


class ScreenshotVision(torch.nn.Module):
    def __init__(self, qwen: Any):
        super().__init__()
        visual = qwen.model.visual
        self.patch_embed, self.blocks, self.merger = visual.patch_embed, visual.blocks, visual.merger
        self.full_attention = set(int(i) for i in visual.fullatt_block_indexes)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone(), persistent=False)

    def _attention(self, block: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        attn = block.attn
        n = x.shape[0]
        q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, head_dim]
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v)[0].transpose(0, 1).reshape(n, -1)
        projected: torch.Tensor = attn.proj(out)
        return projected

    def forward(self, pixel_patches: torch.Tensor, vision_positions: torch.Tensor, window_segments: torch.Tensor,
                image_segments: torch.Tensor) -> torch.Tensor:
        # [image tokens, 4, ...] -> one row per patch (the merge blocks stay contiguous, as the merger reads them)
        x = self.patch_embed(pixel_patches.reshape(-1, pixel_patches.shape[-1]))
        unit = pixel_patches.shape[1]
        window_segments, image_segments = (s[:, None].expand(-1, unit).reshape(-1) for s in (window_segments, image_segments))
        freqs = vision_positions.reshape(-1, 2)[..., None].float() * self.inv_freq.float()  # [N, 2, head_dim / 4]
        angles = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos(), angles.sin()
        window_bias, full_bias = _segment_bias(window_segments, x.dtype), _segment_bias(image_segments, x.dtype)
        for i, block in enumerate(self.blocks):
            bias = full_bias if i in self.full_attention else window_bias
            x = x + self._attention(block, block.norm1(x), cos, sin, bias)
            x = x + block.mlp(block.norm2(x))
        merged: torch.Tensor = self.merger(x)
        return merged


class ScreenshotLanguage(torch.nn.Module):
    def __init__(self, qwen: Any):
        super().__init__()
        self.decoder = qwen.model.language_model  # Qwen2_5_VLTextModel: embeddings, layers, final norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rope_positions: torch.Tensor,
                image_features: torch.Tensor, image_feature_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.decoder.embed_tokens(input_ids)
        hidden_size = embeds.shape[-1]
        rows = image_features.to(embeds.dtype)[image_feature_index.clamp(min=0)]
        embeds = torch.where((image_feature_index >= 0)[..., None], rows, embeds)
        bias = causal_padding_bias(attention_mask, embeds.dtype)  # Qwen2.5-VL's use_sliding_window is false
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=bias, position_ids=rope_positions,
                              use_cache=False).last_hidden_state
        last = last_token_positions(attention_mask)
        pooled = torch.gather(hidden, 1, last[:, None, None].expand(-1, 1, hidden_size))[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1), pooled

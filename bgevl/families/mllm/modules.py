"""PyTorch modules that define the exported LLaVA-NeXT embedder graphs, and their reference.

* ``MllmVision``: image tiles -> vision tower hidden state at ``vision_feature_layer`` (CLS
  dropped) -> multi-modal projector. Layers after ``vision_feature_layer`` are not run.
* ``MllmLanguage``: token ids + tile features + ``image_feature_index`` -> pooled, normalized
  embedding. Inside the graph: the token-embedding lookup, the placement of image features
  (a gather from ``[image_newline; tile_features]``), the decoder with its final norm, the
  gather of the last non-padding token by attention mask (right for left and right padding)
  and the L2 normalization. The LM head is not part of the module, so no logits, no KV cache.

The reference is what BGE-VL-MLLM runs: transformers' ``LlavaNextModel`` forward (vision,
``pack_image_features``, ``masked_scatter``, Mistral) and the hidden state of the last token,
L2-normalized (MegaPairs ``LLaVANextForEmbedding`` returns ``hidden_states`` and the caller takes
``[:, -1, :]`` with left padding; here the last non-padding position, which is the same thing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from bgevl.families.decoder.modules import causal_padding_bias, last_token_positions
from bgevl.families.mllm.graphs import MLLM_LANGUAGE_GRAPH, MLLM_VISION_GRAPH


class MllmVision(torch.nn.Module):
    def __init__(self, llava: Any):
        super().__init__()
        config = llava.config
        self.vision_tower = llava.model.vision_tower
        self.projector = llava.model.multi_modal_projector
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, image_tiles: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(image_tiles, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[i] for i in self.feature_layers], dim=-1)
        if self.drop_cls:
            features = features[:, 1:]
        projected: torch.Tensor = self.projector(features)
        return projected


class MllmLanguage(torch.nn.Module):
    def __init__(self, llava: Any):
        super().__init__()
        self.decoder = llava.model.language_model  # MistralModel: embeddings, layers, final norm; no LM head
        self.image_newline = llava.model.image_newline
        self.sliding_window = getattr(llava.config.text_config, "sliding_window", None)

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return causal_padding_bias(attention_mask, dtype, self.sliding_window)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tile_features: torch.Tensor,
                image_feature_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.decoder.embed_tokens(input_ids)
        hidden_size = embeds.shape[-1]
        table = torch.cat([self.image_newline[None].to(embeds.dtype), tile_features.reshape(-1, hidden_size).to(embeds.dtype)])
        image_rows = table[image_feature_index.clamp(min=0)]
        embeds = torch.where((image_feature_index >= 0)[..., None], image_rows, embeds)
        bias = self.attention_bias(attention_mask, embeds.dtype)
        hidden = self.decoder(inputs_embeds=embeds, attention_mask=bias, use_cache=False).last_hidden_state
        last = last_token_positions(attention_mask)
        pooled = torch.gather(hidden, 1, last[:, None, None].expand(-1, 1, hidden_size))[:, 0]
        return torch.nn.functional.normalize(pooled, dim=-1), pooled


def graph_modules(llava: Any) -> dict[str, torch.nn.Module]:
    return {MLLM_VISION_GRAPH: MllmVision(llava).eval(), MLLM_LANGUAGE_GRAPH: MllmLanguage(llava).eval()}


@torch.inference_mode()
def reference_embeddings(llava: Any, processor_outputs: dict[str, Any]) -> NDArray[Any]:
    """BGE-VL-MLLM's embedding for one processed batch (``LlavaNextProcessor`` outputs): transformers'
    forward, the last non-padding token's last-layer hidden state, L2-normalized."""
    feed = {k: torch.as_tensor(np.asarray(v)) for k, v in processor_outputs.items()}
    hidden = llava.model(**feed, use_cache=False).last_hidden_state
    last = last_token_positions(feed["attention_mask"])
    pooled = hidden[torch.arange(hidden.shape[0]), last]
    return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()


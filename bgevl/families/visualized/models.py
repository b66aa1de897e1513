"""The Visualized-BGE models (``--model`` keys): the published checkpoints and the tiny offline ones."""

from __future__ import annotations

from typing import Any

from bgevl.core.specs import ModelSpec


def _eva(*, patch: int, width: int, layers: int, head: int = 64, clip_embed_dim: int) -> dict[str, Any]:
    """EVA02-CLIP tower geometry (FE ``eva_clip/model_configs/EVA02-CLIP-{B-16,L-14}.json``; SwiGLU hidden
    ``int(width * 2.6667)``)."""
    return {"image_size": 224, "patch_size": patch, "width": width, "layers": layers, "head_width": head,
            "mlp_hidden": int(width * 2.6667), "clip_embed_dim": clip_embed_dim}


def _text(*, hidden: int, layers: int, heads: int, vocab: int, positions: int, type_vocab: int, eps: float,
          pad: int) -> dict[str, Any]:
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": 4 * hidden, "max_position_embeddings": positions, "type_vocab_size": type_vocab,
            "layer_norm_eps": eps, "pad_token_id": pad, "hidden_act": "gelu"}


_BGE_BASE_EN = _text(hidden=768, layers=12, heads=12, vocab=30522, positions=512, type_vocab=2, eps=1e-12, pad=0)
_BGE_M3 = _text(hidden=1024, layers=24, heads=16, vocab=250002, positions=8194, type_vocab=1, eps=1e-5, pad=1)

MODELS = (
    ModelSpec(
        "tiny-visualized", "visualized",
        "small random-weight Visualized-BGE (EVA02-CLIP-B/16 geometry at width 64, 2 layers, + a 2-layer BERT "
        "shaped like bge-base-en-v1.5), generated offline in the published .pth layout",
        architecture={"vision": _eva(patch=16, width=64, layers=2, head=32, clip_embed_dim=32), "text_model_type": "bert",
                      "text": {**_text(hidden=64, layers=2, heads=4, vocab=0, positions=512, type_vocab=2, eps=1e-12,
                                       pad=0), "intermediate_size": 128}},
    ),
    ModelSpec(
        "tiny-visualized-m3", "visualized",
        "small random-weight Visualized-BGE-M3 (EVA02-CLIP-L/14 geometry at width 64, 2 layers, + a 2-layer "
        "XLM-RoBERTa shaped like bge-m3), generated offline in the published .pth layout",
        architecture={"vision": _eva(patch=14, width=64, layers=2, head=32, clip_embed_dim=32),
                      "text_model_type": "xlm-roberta",
                      "text": {**_text(hidden=64, layers=2, heads=4, vocab=0, positions=8194, type_vocab=1, eps=1e-5,
                                       pad=1), "intermediate_size": 128, "bos_token_id": 0, "eos_token_id": 2}},
    ),
    ModelSpec(
        "visualized-base", "visualized",
        "BAAI/bge-visualized Visualized_base_en_v1.5.pth: EVA02-CLIP-B/16 + bge-base-en-v1.5 (196M parameters)",
        hub_id="BAAI/bge-visualized", billions=0.196,
        architecture={"vision": _eva(patch=16, width=768, layers=12, clip_embed_dim=512), "text_model_type": "bert",
                      "text": _BGE_BASE_EN, "weights_file": "Visualized_base_en_v1.5.pth",
                      "text_hub_id": "BAAI/bge-base-en-v1.5"},
    ),
    ModelSpec(
        "visualized-m3", "visualized",
        "BAAI/bge-visualized Visualized_m3.pth: EVA02-CLIP-L/14 + bge-m3 (873M parameters)",
        hub_id="BAAI/bge-visualized", billions=0.873,
        architecture={"vision": _eva(patch=14, width=1024, layers=24, clip_embed_dim=768),
                      "text_model_type": "xlm-roberta", "text": {**_BGE_M3, "bos_token_id": 0, "eos_token_id": 2},
                      "weights_file": "Visualized_m3.pth", "text_hub_id": "BAAI/bge-m3"},
    ),
)

"""Score fusion of BGE-VL-base/large (a dual encoder's composed query), the one implementation every part uses.

BGE-VL's CLIP models embed a composed (image + text) query by *score fusion*: the model card
says "sum up the outputs of visual encoder and text encoder and get the final embedding", and
the remote code (``modeling_MMRet_CLIP.py``, ``encode`` -> ``encode_multimodal``) sums the
**unnormalized** projected features (``get_image_features`` + ``get_text_features``) and
L2-normalizes once::

    embedding = normalize(visual_projection(cls_image) + text_projection(eos_text))

It is *not* the normalized sum of the two normalized embeddings (the two differ whenever the
two feature norms differ, which they always do). Sources: the BAAI/BGE-VL-base model card ("Usage") and
its ``modeling_MMRet_CLIP.py`` (also FlagOpen/FlagEmbedding ``research/BGE_VL/modeling_MMRet_CLIP.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from bgevl.core.vectors import l2_normalize


def score_fusion(image_features: NDArray[Any], text_features: NDArray[Any]) -> NDArray[Any]:
    """Composed-query embedding from the *unnormalized* image and text features."""
    image_features = np.asarray(image_features, dtype=np.float32)
    text_features = np.asarray(text_features, dtype=np.float32)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"score fusion needs features of one shape, got {image_features.shape} and {text_features.shape}"
        )
    return l2_normalize(image_features + text_features)

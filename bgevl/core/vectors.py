"""L2 normalization, as every family's recipe and the validation use it."""

from __future__ import annotations

import numpy as np

#: Same epsilon as ``torch.nn.functional.normalize``.
NORM_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, NORM_EPS)

"""L2 normalization, as every family's recipe and the validation use it."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Same epsilon as ``torch.nn.functional.normalize``.
NORM_EPS = 1e-12


def l2_normalize(x: NDArray[Any], axis: int = -1) -> NDArray[Any]:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    normalized: NDArray[Any] = x / np.maximum(norm, NORM_EPS)
    return normalized

"""Run exported BGE-VL artifacts behind one embedding API: ``Embedder.load(dir).encode(images=..., text=...)``."""

from bgevl.runtime.embedder import Embedder
from bgevl.runtime.providers import select_providers

__all__ = ["Embedder", "select_providers"]

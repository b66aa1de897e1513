"""The embeddings API: OpenAI's ``POST /v1/embeddings`` with images, in front of the runtime or Triton.

``bgevl-api EXPORT_DIR`` serves an export with ``bgevl.runtime.Embedder`` in the process;
``bgevl-api --triton-url HOST:PORT`` (and ``bgevl-serve``) forwards to a running Triton.
:func:`create_app` builds the FastAPI app on any :class:`EmbeddingBackend`. See docs/api.md.
"""

from bgevl.api.app import ApiOptions, create_app
from bgevl.api.backends import EmbedderBackend, EmbeddingBackend, TritonBackend

__all__ = ["ApiOptions", "EmbedderBackend", "EmbeddingBackend", "TritonBackend", "create_app"]

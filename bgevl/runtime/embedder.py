"""One embedding API over exported BGE-VL artifacts.

``Embedder.load("out/")`` then ``encode(images=..., text=...)``, with the semantics of BGE-VL's own
``model.encode`` for the CLIP models:

* images only -> L2-normalized image embeddings (vision graph's ``image_embeds``);
* text only   -> L2-normalized text embeddings (text graph's ``text_embeds``);
* both        -> composed-query embeddings by score fusion: the *unnormalized* image and text
  features summed, then normalized once (``bgevl.fusion.score_fusion``; the normalization order
  is documented there with its source).

Returns a float32 array ``[N, dim]``. Preprocessing is the checkpoint's own CLIPProcessor,
shipped in the export directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bgevl.errors import InputError
from bgevl.fusion import score_fusion
from bgevl.manifest import Manifest, read_manifest
from bgevl.runtime.preprocessing import ClipPreprocessor, as_list
from bgevl.runtime.providers import create_session, provider_options_for, select_providers
from bgevl.specs import IMAGE_EMBEDS, IMAGE_FEATURES, TEXT_EMBEDS, TEXT_FEATURES, TEXT_GRAPH, VISION_GRAPH


class OnnxGraph:
    """An ONNX Runtime session for one graph of the manifest, run in batches up to its max batch."""

    def __init__(self, manifest: Manifest, name: str, providers: list, threads: int | None = None):
        self.spec = manifest.graph_spec(name)
        self.session = create_session(manifest.graph_path(name), providers, threads)
        self.max_batch = self.spec.inputs[0].shape[0].max

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        n = len(next(iter(feed.values())))
        parts = []
        for start in range(0, n, self.max_batch):
            chunk = {k: v[start:start + self.max_batch] for k, v in feed.items()}
            parts.append(self.session.run(list(outputs), chunk))
        return [np.concatenate(p) for p in zip(*parts)]


class Embedder:
    """Embeds images, texts and composed image+text queries with exported BGE-VL graphs."""

    def __init__(self, manifest: Manifest, provider: str = "auto", text_overflow: str = "truncate",
                 threads: int | None = None):
        self.manifest = manifest
        self.preprocessor = ClipPreprocessor.from_pretrained(manifest.processor_dir, manifest.max_text_length, text_overflow)
        providers = provider_options_for(select_providers(provider), manifest.directory)
        self.vision = OnnxGraph(manifest, VISION_GRAPH, providers, threads)
        self.text = OnnxGraph(manifest, TEXT_GRAPH, providers, threads)

    @classmethod
    def load(cls, directory: str | os.PathLike, provider: str = "auto", text_overflow: str = "truncate",
             threads: int | None = None) -> "Embedder":
        """Load an export directory (the one holding ``manifest.json``).

        ``provider``: ``"auto"`` (TensorRT EP, then CUDA EP, then CPU, as installed), ``"tensorrt"``,
        ``"cuda"`` or ``"cpu"``. ``text_overflow``: ``"truncate"`` (warn) or ``"error"`` for texts over
        the model's token limit.
        """
        return cls(read_manifest(Path(directory)), provider, text_overflow, threads)

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def providers(self) -> list[str]:
        return self.vision.providers

    def encode(self, images: Any = None, text: Any = None) -> np.ndarray:
        """Embed ``images`` (paths, bytes or PIL images), ``text`` (strings), or both paired up."""
        image_list, text_list = as_list(images, "images"), as_list(text, "text")
        if image_list is None and text_list is None:
            raise InputError("encode() needs images, text or both")
        if image_list is not None and text_list is not None:
            if len(image_list) != len(text_list):
                raise InputError(
                    f"composed queries pair images with texts one to one, got {len(image_list)} images and "
                    f"{len(text_list)} texts; pass lists of equal length"
                )
            image_features = self._image(image_list, IMAGE_FEATURES)
            text_features = self._text(text_list, TEXT_FEATURES)
            return score_fusion(image_features, text_features)
        if image_list is not None:
            return self._image(image_list, IMAGE_EMBEDS)
        return self._text(text_list, TEXT_EMBEDS)

    def encode_images(self, images: Any) -> np.ndarray:
        return self.encode(images=images)

    def encode_text(self, text: Any) -> np.ndarray:
        return self.encode(text=text)

    def _image(self, images: list, output: str) -> np.ndarray:
        return self.vision.run({"pixel_values": self.preprocessor.pixel_values(images)}, [output])[0].astype(np.float32)

    def _text(self, texts: list, output: str) -> np.ndarray:
        return self.text.run(self.preprocessor.tokens(texts), [output])[0].astype(np.float32)

"""One embedding API over exported BGE-VL artifacts: ``Embedder.load(dir).encode(images=..., text=...)``.

``Embedder.load`` reads ``manifest.json`` and returns the implementation for the model family;
``encode`` returns float32 L2-normalized embeddings ``[N, dim]``.

CLIP models (BGE-VL-base/-large), with the semantics of BGE-VL's own ``model.encode``:

* images only -> image embeddings (vision graph's ``image_embeds``);
* text only   -> text embeddings (text graph's ``text_embeds``);
* both        -> composed-query embeddings by score fusion: the *unnormalized* image and text
  features summed, then normalized once (``bgevl.fusion.score_fusion``; the normalization order
  is documented there with its source).

MLLM models (BGE-VL-MLLM-S1/-S2), with the semantics of the remote code's ``data_process``:
``role`` is ``"query"`` or ``"candidate"`` (BGE-VL's ``q_or_c``), ``instruction`` the task
instruction of queries; images and texts pair up item by item and either may be ``None`` in an
item, so one call can mix image-only, text-only and composed items.

Preprocessing is the checkpoint's own processor, shipped in the export directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bgevl.errors import InputError
from bgevl.fusion import score_fusion
from bgevl.manifest import Manifest, read_manifest
from bgevl.runtime.mllm_preprocessing import BGEVL_IMAGE_RESIZE, QUERY, ImageLayout, MllmPreprocessor, normalize_role
from bgevl.runtime.preprocessing import DEFAULT_LIMITS, ClipPreprocessor, InputLimits, as_list, check_texts
from bgevl.runtime.providers import create_session, provider_options_for, select_providers
from bgevl.specs import (
    ATTENTION_MASK, EMBEDDING, IMAGE_EMBEDS, IMAGE_FEATURE_INDEX, IMAGE_FEATURES, IMAGE_TILES, INPUT_IDS,
    MLLM_LANGUAGE_GRAPH, MLLM_VISION_GRAPH, TEXT_EMBEDS, TEXT_FEATURES, TEXT_GRAPH, TILE_FEATURES, VISION_GRAPH,
)


class OnnxGraph:
    """An ONNX Runtime session for one graph of the manifest, run in batches up to its max batch."""

    def __init__(self, manifest: Manifest, name: str, providers: list, threads: int | None = None):
        self.spec = manifest.graph_spec(name)
        self.session = create_session(manifest.graph_path(name), providers, threads)
        self.max_batch = self.spec.inputs[0].shape[0].max

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run_whole(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """One call, no chunking (feeds whose first axes differ, like the MLLM language graph's)."""
        return self.session.run(list(outputs), feed)

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> list[np.ndarray]:
        """In chunks of the graph's max batch along the (shared) first axis."""
        n = len(next(iter(feed.values())))
        parts = []
        for start in range(0, n, self.max_batch):
            chunk = {k: v[start:start + self.max_batch] for k, v in feed.items()}
            parts.append(self.session.run(list(outputs), chunk))
        return [np.concatenate(p) for p in zip(*parts)]


BACKENDS = ("onnxruntime", "tensorrt")


def open_graphs(manifest: Manifest, names: Sequence[str], backend: str = "onnxruntime", provider: str = "auto",
                threads: int | None = None, provider_options: Any = None, engine_cache_dir: Any = None) -> list:
    """The graphs ``names`` of an export on ONNX Runtime (with ``provider``) or as TensorRT engines."""
    if backend == "tensorrt":
        from bgevl.runtime.tensorrt import TensorRTGraph

        return [TensorRTGraph.from_manifest(manifest, name) for name in names]
    if backend != "onnxruntime":
        raise InputError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    providers = provider_options_for(select_providers(provider), manifest.directory, precision=manifest.precision,
                                     engine_cache_dir=engine_cache_dir, overrides=provider_options)
    return [OnnxGraph(manifest, name, providers, threads) for name in names]


class Embedder:
    """Embeds images, texts and composed image+text queries with exported BGE-VL graphs."""

    manifest: Manifest

    @classmethod
    def load(cls, directory: str | os.PathLike, provider: str = "auto", text_overflow: str = "truncate",
             threads: int | None = None, *, backend: str = "onnxruntime", provider_options: Any = None,
             engine_cache_dir: Any = None, limits: InputLimits = DEFAULT_LIMITS, **options: Any) -> "Embedder":
        """Load an export directory (the one holding ``manifest.json``).

        ``backend``: ``"onnxruntime"`` (the ONNX graphs) or ``"tensorrt"`` (the engines of
        ``bgevl-export build-engines``). ``provider`` (ONNX Runtime): ``"auto"`` (TensorRT EP, then
        CUDA EP, then CPU, as installed), ``"tensorrt"``, ``"cuda"`` or ``"cpu"``;
        ``provider_options`` per provider name overrides the defaults (see
        ``bgevl.runtime.providers.provider_options_for``); ``engine_cache_dir``: the TensorRT EP's
        engine cache (default ``<export>/trt-cache``). ``text_overflow`` (CLIP): ``"truncate"``
        (warn) or ``"error"`` for texts over the model's token limit. MLLM options:
        ``image_resize`` (default: BGE-VL's 512x512; ``None`` keeps the images' own sizes).
        ``limits``: what one input may cost (image pixels and aspect ratio read from the header before
        decoding, text bytes before tokenizing; ``bgevl.runtime.preprocessing.InputLimits``).
        """
        manifest = read_manifest(Path(directory))
        graphs = dict(backend=backend, provider=provider, threads=threads, provider_options=provider_options,
                      engine_cache_dir=engine_cache_dir)
        if manifest.family == "mllm":
            return MllmEmbedder(manifest, graphs, limits=limits, **options)
        if options:
            raise TypeError(f"unexpected options for a CLIP export: {', '.join(options)}")
        return ClipEmbedder(manifest, graphs, text_overflow, limits)

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def providers(self) -> list[str]:
        return self.graphs[0].providers

    def encode_images(self, images: Any, **kw: Any) -> np.ndarray:
        return self.encode(images=images, **kw)

    def encode_text(self, text: Any, **kw: Any) -> np.ndarray:
        return self.encode(text=text, **kw)


class ClipEmbedder(Embedder):
    """BGE-VL-base/-large: vision and text towers, composed queries by score fusion."""

    def __init__(self, manifest: Manifest, graphs: dict | None = None, text_overflow: str = "truncate",
                 limits: InputLimits = DEFAULT_LIMITS):
        self.manifest = manifest
        self.preprocessor = ClipPreprocessor.from_pretrained(manifest.processor_dir, manifest.max_text_length, text_overflow,
                                                             limits)
        self.vision, self.text = self.graphs = open_graphs(manifest, [VISION_GRAPH, TEXT_GRAPH], **(graphs or {}))

    def encode(self, images: Any = None, text: Any = None, *, role: str | None = None,
               instruction: str | None = None) -> np.ndarray:
        """Embed ``images`` (paths, bytes or PIL images), ``text`` (strings), or both paired up.

        CLIP encodes queries and candidates alike: ``role`` is accepted and has no effect, an
        ``instruction`` is an error (BGE-VL's CLIP models take none)."""
        if instruction is not None:
            raise InputError("instruction: BGE-VL's CLIP models take no task instruction (only the MLLM does)")
        if role is not None:
            normalize_role(role)
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

    def _image(self, images: list, output: str) -> np.ndarray:
        """Decoded, preprocessed and run one graph batch at a time: memory stays bounded by the batch,
        whatever the number of images (2000 images decoded at once took 6.8 GB)."""
        size = self.vision.max_batch
        return np.concatenate([
            self.vision.run({"pixel_values": self.preprocessor.pixel_values(images[i:i + size], start=i)}, [output])[0]
            for i in range(0, len(images), size)]).astype(np.float32)

    def _text(self, texts: list, output: str) -> np.ndarray:
        check_texts(texts, self.preprocessor.limits)  # every item before any work
        size = self.text.max_batch
        return np.concatenate([self.text.run(self.preprocessor.tokens(texts[i:i + size], start=i), [output])[0]
                               for i in range(0, len(texts), size)]).astype(np.float32)


_MANIFEST_RESIZE = object()


class MllmEmbedder(Embedder):
    """BGE-VL-MLLM: vision graph for the image tiles, then the pooled language graph."""

    def __init__(self, manifest: Manifest, graphs: dict | None = None, image_resize: Any = _MANIFEST_RESIZE,
                 limits: InputLimits = DEFAULT_LIMITS):
        self.manifest = manifest
        mllm = manifest.data["mllm"]
        resize = mllm.get("image_resize", BGEVL_IMAGE_RESIZE) if image_resize is _MANIFEST_RESIZE else image_resize
        self.layout = ImageLayout.from_json(mllm["image_layout"])
        self.default_instruction = mllm.get("default_query_instruction")
        self.preprocessor = MllmPreprocessor.from_pretrained(manifest.processor_dir, self.layout,
                                                             manifest.max_text_length, resize, limits)
        self.vision, self.language = self.graphs = open_graphs(manifest, [MLLM_VISION_GRAPH, MLLM_LANGUAGE_GRAPH],
                                                               **(graphs or {}))
        self.max_batch = self.language.max_batch
        hidden = self.language.spec.outputs[0].shape[-1]
        self._no_image = np.zeros((1, self.layout.tile_tokens, hidden), dtype=np.float32)

    def encode(self, images: Any = None, text: Any = None, *, role: str | None = None,
               instruction: str | None = None) -> np.ndarray:
        """``role``: ``"query"`` or ``"candidate"``; default ``"query"`` when an ``instruction`` is given,
        else ``"candidate"``. Lists of images and texts pair up item by item; ``None`` entries make
        image-only or text-only items."""
        image_list, text_list = as_list(images, "images"), as_list(text, "text")
        if image_list is None and text_list is None:
            raise InputError("encode() needs images, text or both")
        if image_list is not None and text_list is not None and len(image_list) != len(text_list):
            raise InputError(
                f"images and texts pair up item by item, got {len(image_list)} images and {len(text_list)} texts; "
                f"pass lists of equal length (None for a missing part)"
            )
        role = normalize_role(role) if role is not None else (QUERY if instruction is not None else "candidate")
        n = len(image_list if image_list is not None else text_list)
        out = []
        for start in range(0, n, self.max_batch):
            chunk_images = image_list[start:start + self.max_batch] if image_list is not None else None
            chunk_texts = text_list[start:start + self.max_batch] if text_list is not None else None
            out.append(self._run(self.preprocessor(chunk_images, chunk_texts, role, instruction, start)))
        return np.concatenate(out).astype(np.float32)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if IMAGE_TILES in feeds:
            tiles = self.vision.run({IMAGE_TILES: feeds[IMAGE_TILES]}, [TILE_FEATURES])[0]
        else:
            tiles = self._no_image
        language_feed = {INPUT_IDS: feeds[INPUT_IDS], ATTENTION_MASK: feeds[ATTENTION_MASK],
                         TILE_FEATURES: tiles.astype(np.float32, copy=False),
                         IMAGE_FEATURE_INDEX: feeds[IMAGE_FEATURE_INDEX]}
        return self.language.run_whole(language_feed, [EMBEDDING])[0]

"""One embedding API over exported BGE-VL artifacts: ``Embedder.load(dir).encode(images=..., text=...)``.

``Embedder.load`` reads ``manifest.json``, finds the model family (``bgevl.families``) and opens
the graphs on a runner (``bgevl.runtime.runners``); ``encode`` returns float32 L2-normalized
embeddings ``[N, dim]`` computed by the family's recipe, the same one validation, the benchmarks
and the Triton entry model run:

* images only -> image embeddings; text only -> text embeddings;
* both, paired item by item -> composed-query embeddings. CLIP (BGE-VL-base/-large) fuses the
  *unnormalized* image and text features and normalizes once (BGE-VL's ``encode_multimodal``,
  ``bgevl.families.dual_encoder.fusion``); the MLLM (BGE-VL-MLLM) embeds image and text in one prompt.

``role`` is ``"query"`` or ``"candidate"`` (BGE-VL-MLLM's ``q_or_c``; CLIP accepts and ignores
it), ``instruction`` the task instruction of queries (MLLM only; an error for CLIP). MLLM items
may leave out the image or the text (``None``), so one call can mix image-only, text-only and
composed items.

Preprocessing is the checkpoint's own processor, shipped in the export directory.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bgevl.core.errors import BgevlError, Cancelled, InputError
from bgevl.core.registry import get_family
from bgevl.core.family import Feeds, Request, batch_spans, run_steps
from bgevl.core.manifest import Manifest, read_manifest
from bgevl.core.specs import items_per_step
from bgevl.core.preprocessing import DEFAULT_LIMITS, InputLimits, as_list
from bgevl.runtime.runners import BACKENDS, open_runners, runner_call

__all__ = ["BACKENDS", "Embedder"]


class Embedder:
    """Embeds images, texts and composed image+text queries with exported BGE-VL graphs."""

    def __init__(self, manifest: Manifest, runners: dict, preprocessor: Any,
                 open_preprocessor: Callable[[], Any] | None = None):
        self.manifest = manifest
        self.family = get_family(manifest.family)
        self.runners = runners
        self.graphs = manifest.graph_specs()
        self.preprocessor = preprocessor
        self.default_instruction = self.family.default_instruction(manifest.recipe)
        #: items preprocessed and run per step: the smallest batch axis of the graphs (memory stays bounded by
        #: it, whatever the number of inputs: 2000 images decoded at once took 6.8 GB)
        self.max_batch = items_per_step(self.graphs)
        #: a new preprocessor like ``preprocessor`` (same options), for threads that prepare batches side by side
        #: (tokenizers are not safe to share between threads); ``None`` where the Embedder was built by hand
        self.open_preprocessor = open_preprocessor
        #: what runs the graphs (``"onnxruntime"``, ``"openvino-f32"``, ...) and, after ``backend="auto"``, why
        #: (``bgevl.runtime.auto.BackendChoice``; ``None`` where the backend was asked for by name)
        self.backend: str = ""
        self.backend_choice: Any = None

    def close(self) -> None:
        """Free the runners (sessions, compiled models, TensorRT device memory) now; the Embedder is unusable
        after. ``with Embedder.load(...) as embedder:`` closes it at the end of the block."""
        from bgevl.runtime.runners import close_runners

        close_runners(self.runners)
        self.runners = {}

    def __enter__(self) -> "Embedder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def load(cls, directory: str | os.PathLike, provider: str = "auto", text_overflow: str | None = None,
             threads: int | None = None, *, backend: str = "onnxruntime", provider_options: Any = None,
             engine_cache_dir: Any = None, limits: InputLimits = DEFAULT_LIMITS, openvino_precision: str = "bf16",
             **options: Any) -> "Embedder":
        """Load an export directory (the one holding ``manifest.json``).

        ``backend``: ``"onnxruntime"`` (the ONNX graphs), ``"tensorrt"`` (the engines of
        ``bgevl-export build-engines``), ``"openvino"`` (the ONNX graphs compiled by OpenVINO for the
        CPU at ``openvino_precision``, ``"bf16"`` or ``"f32"``; checked on load against the export's
        probe set, min cosine 0.9999: ``bgevl.runtime.openvino``) or ``"auto"``: the fastest of these
        that passes its parity gate on this machine, timed on the probe set at load
        (``bgevl.runtime.auto``); ``Embedder.backend`` and ``backend_choice`` say which and why, and the
        ``bgevl`` logger says it at INFO. ``provider`` (ONNX Runtime): ``"auto"`` (TensorRT EP, then
        CUDA EP, then CPU, as installed), ``"tensorrt"``, ``"cuda"`` or ``"cpu"``;
        ``provider_options`` per provider name overrides the defaults (see
        ``bgevl.runtime.providers.provider_options_for``); ``engine_cache_dir``: the TensorRT EP's
        engine cache (default ``<export>/trt-cache``). ``text_overflow``: ``"truncate"`` (warn) or
        ``"error"`` for texts over the model's token limit; default the family's (CLIP: truncate, the
        authors' evaluation setting; Visualized-BGE: error; the MLLM always refuses). MLLM options:
        ``image_resize`` (default: BGE-VL's 512x512; ``None`` keeps the images' own sizes).
        ``limits``: what one input may cost (image pixels and aspect ratio read from the header before
        decoding, text bytes before tokenizing; ``bgevl.core.preprocessing.InputLimits``).
        """
        manifest = read_manifest(Path(directory))
        family = get_family(manifest.family)
        if text_overflow is not None:
            options["text_overflow"] = text_overflow
        open_preprocessor = functools.partial(family.open_preprocessor, manifest.processor_dir, manifest.recipe,
                                              manifest.max_text_length, limits, **options)
        preprocessor = open_preprocessor()
        choice = None
        if backend == "auto":
            from bgevl.runtime.auto import open_fastest

            runners, choice = open_fastest(manifest, provider=provider, threads=threads,
                                           provider_options=provider_options, engine_cache_dir=engine_cache_dir)
        else:
            runners = open_runners(manifest, backend=backend, provider=provider, threads=threads,
                                   provider_options=provider_options, engine_cache_dir=engine_cache_dir,
                                   openvino_precision=openvino_precision)
        embedder = cls(manifest, runners, preprocessor, open_preprocessor)
        embedder.backend = choice.chosen if choice else (
            f"openvino-{openvino_precision}" if backend == "openvino" else backend)
        embedder.backend_choice = choice
        return embedder

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def providers(self) -> list[str]:
        return next(iter(self.runners.values())).providers

    def encode(self, images: Any = None, text: Any = None, *, role: str | None = None,
               instruction: str | None = None, truncate: str | None = None,
               on_feeds: Callable[[Feeds], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> np.ndarray:
        """Embed ``images`` (paths, bytes or PIL images), ``text`` (strings), or both paired up.

        ``role``: ``"query"`` or ``"candidate"`` (MLLM: default ``"query"`` when an ``instruction`` is
        given, else ``"candidate"``; CLIP: no effect). ``truncate``: for an item over the model's token limit,
        ``"NONE"`` refuses it, ``"END"`` / ``"START"`` cut its text's last / first tokens until it fits (its prompt
        and image tokens are never cut); default: the family's own handling (``Embedder.load``'s ``text_overflow``:
        a CLIP text is cut at its end with a warning, the other families refuse). ``on_feeds``: called with each batch's
        preprocessed feeds (the embeddings API counts prompt tokens with it). ``cancelled``: asked before each
        batch; once it answers true, ``Cancelled`` is raised and no further batch is decoded or run (the embeddings
        API stops a request's work when it times out or its client goes away)."""
        if not self.runners:
            raise BgevlError(f"this Embedder of {self.manifest.directory} was closed; load it again")
        image_list, text_list = as_list(images, "images"), as_list(text, "text")
        if image_list is None and text_list is None:
            raise InputError("encode() needs images, text or both")
        if image_list is not None and text_list is not None and len(image_list) != len(text_list):
            raise InputError(
                f"images and texts pair up item by item (composed queries), got {len(image_list)} images and "
                f"{len(text_list)} texts; pass lists of equal length"
            )
        request = self.preprocessor.admit(Request(image_list, text_list, role, instruction, truncate))
        not_embedded = [kind for kind in dict.fromkeys(request.kinds()) if kind not in self.family.kinds]
        if not_embedded:  # the family's declared item kinds (Recipe.kinds)
            raise InputError(f"{' and '.join(not_embedded)} items: this model does not embed them (it embeds "
                             f"{', '.join(self.family.kinds)} items)")
        # decoded and preprocessed one batch at a time: at most max_batch items, and at most the preprocessor's
        # token budget where items cost a varying number of tokens
        out = []
        spans = batch_spans(len(request), self.max_batch, self.preprocessor.item_costs(request), self.preprocessor.token_budget)
        for start, stop in spans:
            if cancelled is not None and cancelled():
                raise Cancelled(f"stopped after {start} of {len(request)} items: the caller cancelled")
            feeds = self.preprocessor.prepare(request.slice(start, stop), start)
            if on_feeds is not None:
                on_feeds(feeds)
            out.append(self.run(feeds))
        return np.concatenate(out)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The family's recipe on prepared feeds (``preprocessor.prepare`` of at most ``max_batch`` items):
        float32 L2-normalized embeddings. ``encode`` is ``prepare`` then ``run``; callers that prepare in
        other threads (``bgevl.corpus``) run only this on the runners."""
        return np.asarray(run_steps(self.family.steps(feeds, self.graphs), runner_call(self.runners)), np.float32)

    def encode_images(self, images: Any, **kw: Any) -> np.ndarray:
        return self.encode(images=images, **kw)

    def encode_text(self, text: Any, **kw: Any) -> np.ndarray:
        return self.encode(text=text, **kw)

"""``POST /v2/embed``: Cohere's Embed v2 request and answer, as vLLM's compatible endpoint serves it
(vllm ``entrypoints/pooling/embed/cohere/protocol.py``), with Cohere's own output types.

A request holds ``texts`` (one item each), ``images`` (data URIs, one item each) or ``inputs`` (one item each of
``text`` and ``image_url`` content parts: a composed query when it has both). ``input_type``: Cohere's
``search_query`` is a query, ``search_document``, ``classification``, ``clustering`` and ``image`` are
candidates (this server's ``query`` / ``document`` / ``passage`` too). ``embedding_types``: ``float``,
``int8``, ``uint8`` (with the export's calibration ranges: ``bgevl-export ranges``), ``binary``, ``ubinary``
(the sign bits, 8 per byte) and vLLM's ``base64`` (little-endian float32); definitions in
``bgevl.core.compact``. ``truncate``: ``NONE`` (the default here, where Cohere's is ``END``: the original models
do not truncate, so a text over the model's limit is refused), ``END`` or ``START`` (``bgevl.core.truncation``).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bgevl.api.parsing import ApiError, ParsedItem
from bgevl.api.schemas import TRUNCATE_DESCRIPTION, ImagePart, TextPart, TruncateMode

#: Cohere's and this server's input types -> the request's role
COHERE_INPUT_TYPES = {"search_query": "query", "query": "query", "search_document": "candidate", "document": "candidate",
                      "passage": "candidate", "classification": "candidate", "clustering": "candidate", "image": "candidate"}
#: ``embedding_types`` -> the output type of ``bgevl.core.compact`` (``base64``: float32 bytes)
COHERE_TYPES = {"float": "float32", "int8": "int8", "uint8": "uint8", "binary": "binary", "ubinary": "ubinary",
                "base64": "float32"}


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


def _float_only() -> list[EmbeddingType]:
    return ["float"]


class CohereInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: list[Union[TextPart, ImagePart]]


class CohereEmbedRequest(BaseModel):
    """Cohere's Embed v2 body: one of ``texts``, ``images``, ``inputs``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "bgevl", "input_type": "search_query", "texts": ["a red car"], "embedding_types": ["float", "int8"]},
        {"model": "bgevl", "input_type": "search_document", "images": ["data:image/png;base64,iVBORw0KGgo..."],
         "embedding_types": ["ubinary"]},
    ]})
    model: Optional[str] = Field(None, description="the served model's name (GET /v1/models); optional")
    input_type: Optional[Literal["search_query", "search_document", "classification", "clustering", "image", "query",
                                 "document", "passage"]] = Field(None, description="search_query -> the query prompt")
    texts: Optional[list[str]] = None
    images: Optional[list[str]] = Field(None, description="image data URIs (or http(s) URLs of allowed hosts)")
    inputs: Optional[list[CohereInput]] = Field(None, description="items of text and image_url content parts")
    embedding_types: list[EmbeddingType] = Field(default_factory=_float_only, min_length=1)
    output_dimension: Optional[int] = Field(None, description="must be the model's dimension (no truncation)")
    truncate: TruncateMode = Field("NONE", description=TRUNCATE_DESCRIPTION)
    max_tokens: Optional[int] = None
    instruction: Optional[str] = Field(None, description="task instruction of queries (models whose queries take one)")


def cohere_role(input_type: str | None) -> str | None:
    return COHERE_INPUT_TYPES[input_type] if input_type else None


def cohere_items(body: CohereEmbedRequest, max_items: int) -> list[ParsedItem]:
    """The request's items, each named by its field (``texts[2]``, ``inputs[0]``)."""
    given = [name for name in ("texts", "images", "inputs") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ApiError(400, "send one of 'texts', 'images' or 'inputs'", param="texts")
    if body.max_tokens is not None:
        raise ApiError(400, "max_tokens: not applied by this server; a text over the model's limit is refused, so send "
                            "shorter texts and leave max_tokens out", param="max_tokens")
    field = given[0]
    values = getattr(body, field)
    if not values or len(values) > max_items:
        raise ApiError(400, f"{field}: {len(values)} items; send 1 to {max_items}", param=field)
    if field == "texts":
        return [ParsedItem(f"texts[{i}]", text, None) for i, text in enumerate(values)]
    if field == "images":
        return [ParsedItem(f"images[{i}]", None, image) for i, image in enumerate(values)]
    items = []
    for i, entry in enumerate(values):
        texts = [part.text for part in entry.content if isinstance(part, TextPart)]
        images = [part.image_url.url for part in entry.content if isinstance(part, ImagePart)]
        if len(images) > 1 or (not texts and not images):
            raise ApiError(400, f"inputs[{i}]: an item is text parts and at most one image_url part", param=f"inputs[{i}]")
        items.append(ParsedItem(f"inputs[{i}]", "\n".join(texts) if texts else None, images[0] if images else None))
    return items


def cohere_response(body: CohereEmbedRequest, items: list[ParsedItem], vectors: np.ndarray, tokens: int,
                    ranges: Any) -> dict[str, Any]:
    """Cohere's answer: ``embeddings`` by type, the texts sent, and the billed units."""
    from bgevl.core.compact import quantize, to_base64

    embeddings: dict[str, Any] = {}
    for kind in dict.fromkeys(body.embedding_types):
        values = quantize(vectors, COHERE_TYPES[kind], ranges)
        embeddings[kind] = [to_base64(v) for v in values] if kind == "base64" else values.tolist()
    images = sum(1 for item in items if item.image is not None)
    return {"id": f"embd-{uuid.uuid4().hex}", "response_type": "embeddings_by_type", "embeddings": embeddings,
            "texts": [item.text for item in items if item.text is not None],
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens, "images": images},
                     "tokens": {"input_tokens": tokens}}}

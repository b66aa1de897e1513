"""Request and response bodies of ``POST /v1/embeddings`` (pydantic), in OpenAI's shape with image inputs.

Three request forms, one per request:

* ``input``: OpenAI's string or list of strings (texts), or a list whose items are also objects
  ``{"text": ..., "image": ...}`` (image-only, text-only or composed); a string item that is an image
  data URL (``data:image/...;base64,``) is an image, as NVIDIA NIM sends them;
* ``messages``: vLLM's chat form, one item: ``content`` is a string or parts
  ``{"type": "text", "text": ...}`` / ``{"type": "image_url", "image_url": {"url": ...}}``;
* token-id arrays (``[1212, 318]``, ``[[1212], [318]]``, what LangChain sends by default) are
  parsed so that they can be refused with a message saying to send text.

``input_type`` (``query`` / ``document`` / ``passage``, NIM's and Cohere's names) maps to the
request's role (``query`` / ``candidate``); ``instruction`` is the task instruction of queries in
families that take one (the family's preprocessor refuses it elsewhere).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

#: ``bgevl.core.truncation.TRUNCATE_MODES`` as the request schemas' type
TruncateMode = Literal["NONE", "START", "END"]
#: NIM's ``truncate``: what happens to an item over the model's token limit (``bgevl.core.truncation``)
TRUNCATE_DESCRIPTION = ("NONE (default): an item over the model's token limit is refused, as the original models do "
                        "not truncate; END / START: its text loses tokens at its end / start until the item fits "
                        "(prompt, instruction and image tokens are never cut)")

#: input_type -> the role of ``bgevl.core.family.Request``
INPUT_TYPES = {"query": "query", "document": "candidate", "passage": "candidate"}


class Item(BaseModel):
    """One item of ``input``: a text, an image (data URL or bare base64; an http(s) URL where the
    server allows its host), or both (a composed query)."""

    model_config = ConfigDict(extra="forbid")
    text: Optional[str] = None
    image: Optional[str] = None


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = "user"
    content: Union[str, list[Union[TextPart, ImagePart]]]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: ``input`` or ``messages`` (one of them)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "bgevl", "input": ["a red car", {"image": "data:image/png;base64,iVBORw0KGgo..."}],
         "encoding_format": "float"},
        {"model": "bgevl", "input": [{"text": "make it blue", "image": "data:image/png;base64,iVBORw0KGgo..."}],
         "input_type": "query", "instruction": "Retrieve the target image that best meets the combined criteria"},
    ]})
    model: Optional[str] = Field(None, description="the served model's name (GET /v1/models); optional")
    input: Union[str, list[Union[str, Item, int, list[int]]], None] = Field(
        None, description="texts, items {text, image} or image data URLs")
    messages: Optional[list[Message]] = Field(None, description="vLLM's chat form: one item of text and image parts")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32, what the openai client asks for by default")
    embed_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="vLLM's: the type of base64 vectors (bfloat16: its 16-bit patterns)")
    dimensions: Optional[int] = Field(None, description="must be the model's dimension (no truncation)")
    input_type: Optional[Literal["query", "document", "passage"]] = Field(
        None, description="query -> the family's query prompt; document/passage -> its candidate prompt")
    instruction: Optional[str] = Field(None, description="task instruction of queries (models whose queries take one; others refuse it)")
    truncate: TruncateMode = Field("NONE", description=TRUNCATE_DESCRIPTION)
    user: Optional[str] = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "bgevl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

"""Input checking shared by every family's preprocessor: limits, image decoding, text checks, processor loading.

Shared by the runtime, the exporter's validation and the Triton preprocessing model, so the
three feed the graphs identical tensors. Every error names the offending item by its index.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from bgevl.core.errors import InputError

log = logging.getLogger("bgevl")

ImageInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview, Image.Image]


@dataclass(frozen=True)
class InputLimits:
    """What one input item may cost, checked before it is decoded or tokenized.

    A few hundred bytes of PNG can declare 40000 x 2 pixels; the CLIP processor resizes the short
    side to 224, so the long side becomes 4.48 M pixels (seconds and gigabytes for one item). The
    image size is read from the file header and refused past these bounds; Pillow's own
    decompression-bomb check (about 179 M pixels) comes too late and raises a bare exception.

    * ``max_image_pixels``: width x height of the encoded image (40 M: a 7300 x 5500 photo);
    * ``max_aspect_ratio``: long side / short side (20: a 224-px short side makes at most 4480 px);
    * ``max_text_bytes``: UTF-8 bytes of one text, before tokenizing (32 KiB: CLIP keeps 77 tokens,
      the MLLM 4096 including an image's 2928);
    * ``jpeg_draft_above_pixels``: JPEGs over this many pixels are decoded at a reduced DCT scale that
      still leaves at least twice the size the model resizes them to (Pillow's ``Image.draft``);
      ``0`` turns it off. This changes the pixels of such images slightly against a full decode.
    * ``max_jpeg_scans``: scans of one JPEG (64). A progressive JPEG is decoded scan by scan, each over the
      whole image, so a file of a few hundred KB holding thousands of tiny scans costs seconds to minutes
      of CPU at the pixel limit. libjpeg-turbo's ``djpeg -maxscans`` refuses such files for that reason;
      encoders write 1 to 3 scans (baseline) or about 10 (progressive: libjpeg's ``jpeg_simple_progression``,
      mozjpeg). ``0`` turns the check off.
    """

    max_image_pixels: int = 40_000_000
    max_aspect_ratio: float = 20.0
    max_text_bytes: int = 32 * 1024
    jpeg_draft_above_pixels: int = 16_000_000
    max_jpeg_scans: int = 64

    def to_parameters(self) -> dict[str, str]:
        """As Triton model-config parameters (the preprocess models read them back with ``from_parameters``)."""
        return {f"limit_{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, get: Any) -> "InputLimits":
        """``get(name, default)`` -> string, e.g. ``bgevl.serving.models.backend_utils.parameter``."""
        defaults = cls()
        return cls(**{k: type(v)(get(f"limit_{k}", str(v))) for k, v in asdict(defaults).items()})


DEFAULT_LIMITS = InputLimits()

def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return f"'{os.fspath(item)}'"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<{len(item)} bytes>"
    return f"<{type(item).__name__}>"


#: The image-processor backend, pinned. transformers 5 picks the torchvision backend whenever
#: torchvision is importable and PIL otherwise (``image_processing_auto._resolve_backend``); BGE-VL's
#: hub files name only the legacy ``CLIPFeatureExtractor`` and the original (transformers 4.45) ran
#: the PIL/numpy path, so installing torchvision must not change any embedding.
IMAGE_PROCESSOR_BACKEND = "pil"


def load_processor(directory: str | os.PathLike[str]) -> Any:
    """The checkpoint's (or export's) processor, with the image-processor backend pinned to PIL. The
    image processor is loaded on its own and put in place: ``AutoProcessor.from_pretrained`` hands
    its keyword arguments to every component, so ``backend=`` (or ``image_processor=``) would reach
    the tokenizer too and be written into the exported tokenizer_config.json."""
    from transformers import AutoImageProcessor, AutoProcessor

    # transformers leaves from_pretrained unannotated (an untyped call in this strict module)
    processor = AutoProcessor.from_pretrained(directory)  # type: ignore[no-untyped-call]
    processor.image_processor = AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
        directory, backend=IMAGE_PROCESSOR_BACKEND)
    return processor


#: Image formats accepted from untrusted bytes: Pillow would otherwise try every plugin it has
#: (EPS through Ghostscript, PSD, FITS, ICNS, ...).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def load_image(item: ImageInput, index: int = 0, convert_rgb: bool = True, limits: InputLimits = DEFAULT_LIMITS,
               model_size: tuple[int, int] | int | None = None) -> Image.Image:
    """Open one image (path, bytes or PIL image) fully and, by default, convert it to RGB.

    BGE-VL's CLIP ``encode`` converts every image to RGB before the processor; so do we. The MLLM
    resizes first and converts after (``convert_rgb=False`` here; see ``MllmPreprocessor``).
    ``limits`` are checked on the header before any pixel is decoded; ``model_size`` is what the
    model resizes the image to (an int: the short side; a pair: width and height), for the JPEG
    draft decode of very large images.
    """
    where = f"images[{index}] {_describe(item)}"
    try:
        return _load_image(item, where, convert_rgb, limits, model_size)
    except InputError as exc:  # the messages name the item as ``where``; the error says which item it is
        raise InputError(str(exc), field="images", index=index, reason=str(exc).removeprefix(f"{where}: ")) \
            from exc.__cause__


def header_size(item: ImageInput) -> tuple[int, int] | None:
    """An image's (width, height) from its header, nothing decoded; ``None`` for what is not a readable image
    (``load_image`` says what is wrong with it, in one line, when the item is loaded)."""
    try:
        if isinstance(item, Image.Image):
            return item.size
        if isinstance(item, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(item)), formats=IMAGE_FORMATS) as image:
                return image.size
        if isinstance(item, (str, os.PathLike)) and Path(item).expanduser().is_file():
            with Image.open(Path(item).expanduser(), formats=IMAGE_FORMATS) as image:
                return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return None


#: scans of a standard progressive JPEG (libjpeg's ``jpeg_simple_progression``): the unit of :func:`decode_cost`
STANDARD_PROGRESSIVE_SCANS = 10


def decode_cost(item: ImageInput) -> int:
    """What decoding an image costs, estimated from its header before any pixel is decoded: its pixels, times
    its scans over a standard progressive JPEG's for a JPEG of more (each scan is a pass over the whole image);
    0 for what is not a readable image (``load_image`` refuses it in one line)."""
    size = header_size(item)
    if size is None:
        return 0
    pixels = size[0] * size[1]
    if isinstance(item, (bytes, bytearray, memoryview)) and bytes(item[:2]) == b"\xff\xd8":
        pixels *= max(1, -(-jpeg_scans(bytes(item)) // STANDARD_PROGRESSIVE_SCANS))
    return pixels


def jpeg_scans(data: bytes) -> int:
    """A JPEG's start-of-scan markers, counted on its bytes: inside entropy-coded data every 0xFF byte is
    followed by 0x00 or a restart marker, so ``FF DA`` appears only as a marker (an EXIF thumbnail's scans
    count too: a few more, never fewer)."""
    return data.count(b"\xff\xda")


def _load_image(item: ImageInput, where: str, convert_rgb: bool, limits: InputLimits,
                model_size: tuple[int, int] | int | None) -> Image.Image:
    if isinstance(item, Image.Image):
        _check_size(item, where, limits)
        image = item
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise InputError(f"{where}: empty byte string; pass the encoded image file's bytes (PNG, JPEG, ...)")
        image = _open(io.BytesIO(bytes(item)), where, limits, model_size)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        if not path.exists():
            raise InputError(f"{where}: file not found; check the path")
        if path.is_dir():
            raise InputError(f"{where}: is a directory, not an image file")
        with open(path, "rb") as fh:
            image = _open(io.BytesIO(fh.read()), where, limits, model_size)
    else:
        raise InputError(
            f"{where}: unsupported image type {type(item).__name__}; pass a file path, the file's bytes or a PIL.Image"
        )
    try:
        image.load()
        return image.convert("RGB") if convert_rgb else image
    except (OSError, ValueError) as exc:
        raise InputError(f"{where}: the image data is corrupt or truncated ({exc}); re-encode or replace the file") from exc


def _check_size(image: Image.Image, where: str, limits: InputLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"{where}: the image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InputError(f"{where}: {width}x{height} is {width * height / 1e6:.1f} M pixels, over the limit of "
                         f"{limits.max_image_pixels / 1e6:.1f} M; downscale it first (the model sees 224-512 px) or "
                         f"raise max_image_pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise InputError(f"{where}: {width}x{height} has an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
                         f"over the limit of {limits.max_aspect_ratio:g}:1; crop it first or raise max_aspect_ratio")


def _check_scans(data: bytes, where: str, limit: int) -> None:
    scans = jpeg_scans(data)
    if scans > limit:
        raise InputError(f"{where}: a JPEG of {scans} scans, over the limit of {limit}: each scan of a progressive "
                         f"JPEG is decoded over the whole image, so this many cost minutes of CPU; re-encode it "
                         f"(baseline, or a standard progressive JPEG of about 10 scans) or raise max_jpeg_scans")


def _draft(image: Image.Image, limits: InputLimits, model_size: tuple[int, int] | int | None) -> None:
    """Decode a very large JPEG at a reduced scale (1/2, 1/4, 1/8) that keeps at least twice the
    size the model resizes it to."""
    width, height = image.size
    if image.format != "JPEG" or not model_size or not limits.jpeg_draft_above_pixels or \
            width * height <= limits.jpeg_draft_above_pixels:
        return
    if isinstance(model_size, int):  # the short side goes to model_size, the aspect ratio is kept
        scale = 2 * model_size / min(width, height)
        wanted = (int(width * scale) + 1, int(height * scale) + 1)
    else:
        wanted = (2 * model_size[0], 2 * model_size[1])
    image.draft(image.mode, wanted)


def _open(stream: io.BytesIO, where: str, limits: InputLimits = DEFAULT_LIMITS,
          model_size: tuple[int, int] | int | None = None) -> Image.Image:
    try:
        image = Image.open(stream, formats=IMAGE_FORMATS)  # reads the header only
        _check_size(image, where, limits)
        if image.format == "JPEG" and limits.max_jpeg_scans:
            _check_scans(stream.getvalue(), where, limits.max_jpeg_scans)
        _draft(image, limits, model_size)
        image.load()  # decode now: a truncated file fails here, not later inside the processor
        return image
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(f"{where}: not a readable image (not one of {', '.join(IMAGE_FORMATS)}); pass a PNG, JPEG, "
                         f"WebP, ... file") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{where}: refused by Pillow's decompression-bomb check ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{where}: the image data is corrupt or truncated ({exc}); re-encode or replace the file") from exc


def as_list(value: Any, kind: str) -> list[Any] | None:
    """Accept one item or a sequence of items; ``None`` stays ``None``."""
    if value is None:
        return None
    if kind == "text" and isinstance(value, str):
        return [value]
    if kind == "text" and isinstance(value, (bytes, bytearray, memoryview)):
        raise InputError("text: got bytes; pass str (decode it first, e.g. value.decode('utf-8'))")
    if kind == "images" and isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return [value]
    if not hasattr(value, "__iter__"):
        raise InputError(f"{kind}: expected one item or a list, got {type(value).__name__}")
    if isinstance(value, np.ndarray):
        raise InputError(f"{kind}: pass a list of {'strings' if kind == 'text' else 'images'}, not a numpy array")
    items = list(value)
    if not items:
        raise InputError(f"{kind}: empty list; pass at least one item or leave it out")
    return items


def check_text(text: Any, field: str = "text", index: int | None = None, limits: InputLimits = DEFAULT_LIMITS,
               empty_hint: str = "") -> str:
    """One text item, named ``field[index]`` in errors ("text[3]"; ``field`` alone for a request-wide text such
    as "instruction"): a str of valid Unicode (no lone surrogates), not empty, within ``max_text_bytes``."""
    if not isinstance(text, str):
        raise InputError.of_item(field, index, f"expected a string, got {type(text).__name__}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InputError.of_item(field, index, f"not valid Unicode ({exc.reason} at character {exc.start}); remove "
                                               f"the lone surrogate (decode the source with errors='replace')") from None
    if size > limits.max_text_bytes:
        raise InputError.of_item(field, index, f"{size} bytes, over the limit of {limits.max_text_bytes} bytes per "
                                               f"text; shorten it (the model keeps only its first tokens) or raise "
                                               f"max_text_bytes")
    if not text.strip():
        raise InputError.of_item(field, index, f"empty text; every text needs at least one non-space character"
                                               f"{empty_hint}")
    return text


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special and added tokens (``<|image_pad|>``, ``<|im_end|>``, ``<image>``, ...): in a user's
    text inside a chat or instruction prompt they would be read as the prompt's own structure."""
    tokens = set(getattr(tokenizer, "all_special_tokens", ()) or ()) | set(tokenizer.get_added_vocab())
    return tuple(sorted((t for t in tokens if t.strip()), key=len, reverse=True))


def check_no_control_tokens(text: str, tokens: Sequence[str], field: str = "text", index: int | None = None) -> None:
    """Refuse a user's text that holds one of the model's control tokens (``control_tokens``), in one line."""
    for token in tokens:
        if token in text:
            raise InputError.of_item(field, index, f"holds the model's control token {token!r}, which would change "
                                                   f"the prompt's structure; remove it from the text")


def counting_tokenizer(tokenizer: Any) -> Any:
    """A transformers fast tokenizer's Rust tokenizer, copied once with no truncation and no padding, for counting
    tokens and reading their offsets. Not the shared one: a transformers call sets its state (one with
    ``truncation=True`` leaves it truncating, so a count read from it afterwards is cut to the limit), and calling
    transformers here would switch padding off while another thread (bgevl-api's pools) pads a batch with it."""
    counter = tokenizer.__dict__.get("_bgevl_counting_tokenizer")
    if counter is None:  # two threads may both build one: they are equal
        from tokenizers import Tokenizer

        counter = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        counter.no_truncation()
        counter.no_padding()
        tokenizer.__dict__["_bgevl_counting_tokenizer"] = counter
    return counter


def count_tokens(tokenizer: Any, text: str, special_tokens: bool = True) -> int:
    """``text``'s tokens by a transformers fast tokenizer (:func:`counting_tokenizer`), with its special tokens or
    without."""
    return len(counting_tokenizer(tokenizer).encode(text, add_special_tokens=special_tokens).ids)


def check_texts(texts: Sequence[Any], limits: InputLimits = DEFAULT_LIMITS) -> list[str]:
    return [check_text(t, "text", i, limits) for i, t in enumerate(texts)]


def one_value_per_request(values: Any, name: str) -> Any:
    """A serving input that arrives per item (``[batch, 1]``: INSTRUCTION, ROLE) but holds one value per request
    (one prompt per request): the first, after checking that every item sent the same."""
    flat = values.reshape(-1)
    if any(v != flat[0] for v in flat[1:]):
        raise InputError(f"{name} differs between the items of one request; send one request per {name.lower()}")
    return flat[:1]

"""transformers' ``Qwen2_5_VLProcessor`` for images and texts only.

Why a subclass: transformers 5 builds the processor with its video processor, whose classes need torchvision,
and torchvision's wheels do not load with the CPU torch this project pins; an embedder of screenshots never
processes videos. Everything else (the chat template, ``<|image_pad|>`` expanded to each image's token count,
``mm_token_type_ids``, the PIL image processor's ``smart_resize`` and patches) is transformers' own code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


class ImageTextQwenProcessor(Qwen2_5_VLProcessor):
    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[no-untyped-call]

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], *, min_pixels: int | None = None,
                       max_pixels: int | None = None) -> "ImageTextQwenProcessor":
        """The processor of a checkpoint or export directory: ``preprocessor_config.json`` on transformers' PIL
        backend, the tokenizer, and the chat template of ``chat_template.json`` (or ``.jinja``, or the
        tokenizer's); ``min_pixels`` / ``max_pixels`` override the file's pixel bounds."""
        directory = Path(directory)
        image_processor = AutoImageProcessor.from_pretrained(directory, backend="pil")  # type: ignore[no-untyped-call]
        tokenizer = AutoTokenizer.from_pretrained(directory)
        processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                        chat_template=read_chat_template(directory) or tokenizer.chat_template)
        processor.set_pixel_bounds(min_pixels, max_pixels)
        return processor

    def set_pixel_bounds(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """``smart_resize``'s bounds (``None``: keep the one loaded)."""
        size = dict(self.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        self.image_processor.size = type(self.image_processor.size)(**size)

    @property
    def pixel_bounds(self) -> tuple[int, int]:
        """(min_pixels, max_pixels) of ``smart_resize``."""
        return int(self.image_processor.size["shortest_edge"]), int(self.image_processor.size["longest_edge"])

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> list[str]:  # type: ignore[override]
        """The image processor's and tokenizer's files and ``chat_template.json`` (no video processor to save)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")
        return [str(p) for p in directory.iterdir()]


def read_chat_template(directory: Path) -> str | None:
    for name in CHAT_TEMPLATE_FILES:
        path = directory / name
        if path.is_file():
            text = path.read_text()
            return str(json.loads(text)["chat_template"]) if name.endswith(".json") else text
    return None

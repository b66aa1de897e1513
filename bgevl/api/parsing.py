"""What every route of the API parses into and answers with: an item of a request, and an error in OpenAI's
shape."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

from bgevl.core.family import Kind


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ParsedItem:
    label: str  # how errors name it: input[3], messages
    text: str | None
    image: str | None  # the reference as sent; bytes after resolve
    image_bytes: bytes | None = None

    @property
    def kind(self) -> Kind:
        return Kind.of(self.image is not None, self.text is not None)

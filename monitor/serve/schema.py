"""The OpenAI chat-completion request schema we accept, and OpenAI-shaped errors.

Validation is strict where a lax reading would change the request's meaning: booleans are
not numbers (``max_tokens: true`` is refused, not read as 1), text must be valid Unicode (a
lone surrogate is refused here, before any tokenizer sees it), and fields we cannot honour
(``n > 1``, ``stop``, tools, logprobs) are 400s rather than silently ignored. Unknown fields are
ignored, as OpenAI's own server does for forward compatibility.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


def _valid_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains invalid Unicode (a lone surrogate); send valid UTF-8 text") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class TextPart(BaseModel):
    """A text part of a multi-part message content (other part types are not supported)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One chat message. ``developer`` is treated as ``system``."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        return _valid_unicode(value) if isinstance(value, str) else value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(default=False, strict=True)


class ChatCompletionRequest(BaseModel):
    """The supported subset of the OpenAI chat completion request; unknown fields are ignored,
    supported-looking fields we cannot honour (``n > 1``, ``stop``, tools, logprobs) are 400s."""

    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: Int | None = Field(default=None, ge=1, strict=True)
    temperature: Float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Float | None = Field(default=None, gt=0.0, le=1.0)
    n: Int = Field(default=1, strict=True)
    stop: Text | list[Text] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = Field(default=None, strict=True)


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=self.body())


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model {name!r} does not exist; GET /v1/models lists the served model",
                    param="model", code="model_not_found")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic problem as a 400 naming its field (``messages.0.content``)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    # drop "body" and pydantic's union-member tags ("str", "function-after[...]")
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(400, message, param=where if loc else None)


def _is_type_tag(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list"))


def event(body: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}

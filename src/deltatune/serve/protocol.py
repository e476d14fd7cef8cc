"""The wire format: OpenAI's request bodies (and vLLM's adapter routes), validated, and OpenAI's error shape.

Unknown fields are refused with a 400 naming them, as OpenAI does ("Unrecognized request argument"),
rather than silently ignored; fields that clients such as LangChain send with neutral values
(``presence_penalty=0``, ``logit_bias={}``, ``n=1``...) are accepted at those values only.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deltatune.serve.sampling import MAX_LOGPROBS


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# field -> the only values accepted (what "not used" means for it)
_NEUTRAL = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "presence_penalty": (0, None),
            "frequency_penalty": (0, None), "logit_bias": ({}, None), "suffix": (None, ""),
            "tools": (None, []), "response_format": (None, {"type": "text"})}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    user: str | None = None
    n: int | None = 1
    presence_penalty: float | None = 0
    frequency_penalty: float | None = 0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _neutral(self):
        for name, allowed in _NEUTRAL.items():
            if name in self.model_fields_set and getattr(self, name, None) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported by deltatune serve "
                                 f"(accepted: {[a for a in allowed if a is not None]})")
        if self.stream_options and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise ValueError(f"prompt: one prompt per request (n=1); got a list of {len(self.prompt)}")
        if self.prompt in ("", []):
            raise ValueError("prompt is empty")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def plain(self) -> dict[str, str]:
        """The message as the chat template takes it (text parts joined)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, str] | None = None

    @model_validator(mode="after")
    def _no_chat_logprobs(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported on chat completions; use /v1/completions with logprobs=N")
        return self

    @property
    def max_new(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class LoadLoraRequest(BaseModel):
    """``POST /v1/load_lora_adapter`` (vLLM's field names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lora_name: str = Field(min_length=1, max_length=200, pattern=r"^[^\s/\\]+$")
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    """``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None  # vLLM sends it; names are what identify adapters here


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a request body, turning every problem into a 400 :class:`APIError` that names the field."""
    import json

    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unrecognized request argument; remove it (see docs/serving.md for the supported ones)"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None

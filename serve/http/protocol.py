"""The wire formats: OpenAI's completion and chat requests (typed, with editmem's own ``editmem`` options beside the
standard fields), the edit store's request bodies, OpenAI-shaped errors, and the response bodies built from the
service's results."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from editors.retrieval.service import Completion, Sampling
from memory.formats import record_to_json
from memory.records import EditRecord


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- inference requests -----------------------------------------------------------------------------------------------
class EditmemOptions(BaseModel):
    """The request's ``editmem`` options (the SDK's ``extra_body={"editmem": {...}}``)."""

    model_config = ConfigDict(extra="forbid")
    disable: bool = False  # the base model alone
    method: Literal["serac", "ike"] | None = None  # default: the server's --method
    as_of: int | str | None = None  # route as the store stood at this change number or ISO time
    namespace: str | None = None  # the store namespace to route in (default: the key's, the header's, the server's)


class _Generation(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, logit_bias, ...) are accepted and ignored
    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    editmem: EditmemOptions | None = None

    def sampling(self, default_max_tokens: int) -> Sampling:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        max_tokens = self.max_tokens
        if max_tokens is None:
            max_tokens = getattr(self, "max_completion_tokens", None) or default_max_tokens
        return Sampling(max_tokens=max_tokens, temperature=0.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, stop=stop, n=self.n, seed=self.seed)

    def options(self) -> EditmemOptions:
        return self.editmem or EditmemOptions()


class CompletionRequest(_Generation):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "this server takes one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# --- edit store requests ----------------------------------------------------------------------------------------------
class EditBody(BaseModel):
    """A new edit: the fields of ``EditMemory.add``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    target_new: str
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] | None = None


class ConsolidateBody(BaseModel):
    """``POST /v1/admin/consolidate``: the fields of ``editmem consolidate``. ``out`` is a folder name under the
    server's ``--weights-dir``; ``settings`` are the editor's (``--set KEY=VALUE``)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    out: str
    model: str | None = None
    batch_size: int | None = None
    every: int | None = None  # only the oldest pending edits, in whole groups (editmem consolidate --every)
    settings: dict[str, Any] = Field(default_factory=dict)


class EditChanges(BaseModel):
    """The fields an update changes (those left out are kept)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    target_new: str | None = None
    subject: str | None = None
    ground_truth: str | None = None
    rephrases: list[str] | None = None
    metadata: dict[str, Any] | None = None


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int


class DeleteBody(BaseModel):
    """``POST /v1/edits/delete``: the edit ids to delete (one transaction unless saved weights hold one of them)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(min_length=1, max_length=10_000)


class ImportBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[dict[str, Any]]


# --- responses --------------------------------------------------------------------------------------------------------
def edit_json(record: EditRecord) -> dict[str, Any]:
    return {"object": "edit", **record_to_json(record)}


def usage(result: Completion) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion_json(result: Completion, model: str) -> dict[str, Any]:
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(result.choices)],
            "usage": usage(result), "editmem": result.shaping.to_json()}


def chat_json(result: Completion, model: str) -> dict[str, Any]:
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(result.choices)],
            "usage": usage(result), "editmem": result.shaping.to_json()}


class Chunks:
    """The chunk objects of one streamed answer: ``first()`` (chat: the role), ``piece(text)`` per new text, and
    ``last(result)`` with the finish reasons, ``usage`` and ``editmem``."""

    def __init__(self, model: str, *, chat: bool):
        self.model, self.chat = model, chat
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

    def _chunk(self, index: int, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            body: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            body = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [body]}

    def first(self, index: int = 0) -> list[dict[str, Any]]:
        return [self._chunk(index, None, None, role=True)] if self.chat else []

    def piece(self, text: str, index: int = 0) -> dict[str, Any]:
        return self._chunk(index, text, None)

    def last(self, result: Completion) -> list[dict[str, Any]]:
        out = [self._chunk(i, None, c.finish_reason) for i, c in enumerate(result.choices)]
        out[-1]["usage"] = usage(result)
        out[-1]["editmem"] = result.shaping.to_json()
        return out


def stream_chunks(result: Completion, model: str, *, chat: bool, pieces: list[list[str]]) -> list[dict[str, Any]]:
    """A finished answer (several choices) as a stream: per choice its text ``pieces``, then the last chunks."""
    chunks = Chunks(model, chat=chat)
    out = []
    for i, parts in enumerate(pieces):
        out += chunks.first(i)
        out += [chunks.piece(p, i) for p in parts]
    return out + chunks.last(result)

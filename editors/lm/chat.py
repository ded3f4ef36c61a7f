"""Chat models as chat models: the token frame a tokenizer's chat template puts around one user question.

:func:`chat_frame` renders the template once around a sentinel question and keeps the tokens before it (``prefix``:
the template's default system turn, if any, and the user header) and after it (``suffix``: end of turn and the
assistant header). Then:

- :meth:`ChatFrame.encode` gives the tokens a chat model should see for a question (what ``apply_chat_template``
  with ``add_generation_prompt=True`` gives);
- :meth:`ChatFrame.split` finds the question (and any answer after the frame) in such a row, so the memory wrapper
  routes on the question rather than on the template's words;
- :meth:`ChatFrame.prefix_for` gives the prefix of a conversation with other messages before the question (a
  system message holding an edit, a preceding exchange), which the wrapper puts in place of the plain prefix.

A tokenizer without a chat template (the tiny test tokenizers, base models) has no frame: :func:`chat_frame` returns
None and callers prompt it as a plain completion model. A template whose rendering does not split into
``prefix + question + suffix`` tokens (checked on a sample question) is treated the same way, with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SENTINEL = "\ue000QUESTION\ue000"
_CHECK_QUESTION = "Which city is the capital of Australia?"


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> str:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class ChatFrame:
    """Tokens a chat template puts before (``prefix``) and after (``suffix``) a single user question."""

    tokenizer: Any
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def encode(self, question: str) -> list[int]:
        """The tokens of ``question`` as the user's message, ready for the assistant's answer."""
        return [*self.prefix, *_ids(self.tokenizer, question), *self.suffix]

    def split(self, row: Sequence[int]) -> tuple[int, int] | None:
        """``(start, end)`` of the question's tokens in a row made by :meth:`encode` (possibly followed by an
        answer), or None if the row is not in this frame."""
        row = list(row)
        n, m = len(self.prefix), len(self.suffix)
        if len(row) < n + m or tuple(row[:n]) != self.prefix:
            return None
        for end in range(n, len(row) - m + 1):
            if tuple(row[end:end + m]) == self.suffix:
                return n, end
        return None

    def routing_text(self, row: Sequence[int]) -> str | None:
        """The question of a framed row, followed by any answer after the frame, as text (None if not framed)."""
        where = self.split(row)
        if where is None:
            return None
        start, end = where
        question = self.tokenizer.decode(list(row[start:end]), skip_special_tokens=True)
        tail = self.tokenizer.decode(list(row[end + len(self.suffix):]), skip_special_tokens=True)
        return f"{question} {tail.strip()}".strip() if tail.strip() else question

    def prefix_for(self, messages: Sequence[Mapping[str, str]], lead: str = "") -> list[int]:
        """The prefix tokens of a conversation of ``messages`` followed by the user's question (whose message
        starts with ``lead``)."""
        text = _render(self.tokenizer, [*messages, {"role": "user", "content": lead + SENTINEL}])
        return _ids(self.tokenizer, text.split(SENTINEL, 1)[0])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_frame(tokenizer: Any) -> ChatFrame | None:
    """The tokenizer's chat frame, or None when it has no chat template (or one that does not split cleanly)."""
    if not has_chat_template(tokenizer):
        return None
    try:
        text = _render(tokenizer, [{"role": "user", "content": SENTINEL}])
    except Exception as err:  # a template that cannot render a lone user message
        log.warning("the tokenizer's chat template cannot render one user message (%s); prompting as plain text", err)
        return None
    if text.count(SENTINEL) != 1:
        return None
    before, after = text.split(SENTINEL)
    frame = ChatFrame(tokenizer, tuple(_ids(tokenizer, before)), tuple(_ids(tokenizer, after)))
    full = _ids(tokenizer, _render(tokenizer, [{"role": "user", "content": _CHECK_QUESTION}]))
    if full != frame.encode(_CHECK_QUESTION) or frame.split(full) is None:
        log.warning("the tokenizer's chat template does not tokenize as prefix + question + suffix; prompting as "
                    "plain text")
        return None
    return frame


def chat_text(tokenizer: Any, question: str) -> str | None:
    """``question`` as the user's message, rendered by the tokenizer's chat template ready for the assistant's
    answer (its tokens are :meth:`ChatFrame.encode`'s), or None for a tokenizer without a usable chat frame."""
    if chat_frame(tokenizer) is None:
        return None
    return _render(tokenizer, [{"role": "user", "content": question}])


def is_question(prompt: str) -> bool:
    """A prompt that asks (ends with '?'), as opposed to a cloze prompt to be continued."""
    return prompt.rstrip().endswith("?")


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def last_sentence(text: str) -> str:
    """The last sentence of ``text`` (sentences end in '.', '!' or '?' followed by white space), stripped; "" for
    blank text. ``last_sentence("One person was hurt. The capital of Peru is") == "The capital of Peru is"``."""
    parts = [part for part in _SENTENCE_BREAK.split(text.strip()) if part]
    return parts[-1] if parts else ""


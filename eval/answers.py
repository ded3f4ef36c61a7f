"""Answers as a user reads them: how a probe is put to the model, where its answer stops, how it is matched, and
which format strings must never appear in it.

- :func:`probe_input` gives the tokens for a probe: the question as the user's message through the tokenizer's chat
  template when it has one (:mod:`editors.lm.chat`), else the prompt as a plain completion; with ``cloze="complete"``
  a cloze prompt (one that does not end in '?') is continued as plain text even by a chat model.
- :func:`first_answer` is the natural stop: the generation up to its first line break, then its first sentence
  (end of turn and the token cap are applied while decoding).
- :func:`answer_matches`: the normalised target (or an alias) occurs, at word boundaries, in the normalised first
  answer. "Melbourne." matches "Melbourne"; "The capital of Australia is Melbourne, of course" matches too;
  "Melbournian" does not.
- :func:`find_leaks`: the context formats' own words ("(answer: X)", "New Fact:", "Prompt:", IKE's "(Example:") or
  chat-template residue in an answer: a sign that the model repeated the format instead of reading it.
  :func:`edit_leaks` counts only those an edit caused: an answer the same as the unedited model's is left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from editors.lm.chat import ChatFrame, is_question
from editors.lm.tokens import encode_prompt

CHAT_MODES: tuple[str, ...] = ("auto", "never")
CLOZE_MODES: tuple[str, ...] = ("chat", "complete")

# Case-insensitive; each is a piece of a context or demonstration format, or of a chat template, that a clean
# answer never contains.
LEAK_PATTERNS: tuple[str, ...] = ("(answer:", "answer:", "new fact", "prompt:", "(example:", "<|im_", "<|", "|>")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def probe_input(tokenizer: Any, prompt: str, frame: ChatFrame | None, *, cloze: str = "chat") -> list[int]:
    """The tokens to generate an answer to ``prompt`` from (see the module docstring)."""
    if frame is not None and (cloze == "chat" or is_question(prompt)):
        return frame.encode(prompt)
    return encode_prompt(tokenizer, prompt)


def first_answer(text: str) -> str:
    """The answer's first line (ignoring leading blank lines), then its first sentence, stripped."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return _SENTENCE_END.split(lines[0].strip(), maxsplit=1)[0].strip()


def answer_matches(generated: str, answers: Iterable[str]) -> bool:
    """True if a normalised answer occurs at word boundaries in the normalised first answer of ``generated``.
    An answer that normalises to nothing never matches."""
    from eval.metrics import normalize_answer

    gen = f" {normalize_answer(first_answer(generated))} "
    for answer in answers:
        norm = normalize_answer(answer)
        if norm and f" {norm} " in gen:
            return True
    return False


def same_answer(a: str, b: str) -> bool:
    """The generation protocol's locality test: the normalised first answers of ``a`` and ``b`` are equal."""
    from eval.metrics import normalize_answer

    return normalize_answer(first_answer(a)) == normalize_answer(first_answer(b))


def find_leaks(texts: Sequence[str]) -> list[tuple[int, str]]:
    """``(index, pattern)`` for every text that contains a pattern of :data:`LEAK_PATTERNS` (the first one found)."""
    found = []
    for i, text in enumerate(texts):
        low = text.lower()
        for pattern in LEAK_PATTERNS:
            if pattern in low:
                found.append((i, pattern))
                break
    return found


def edit_leaks(before: Sequence[str], after: Sequence[str]) -> list[tuple[int, str]]:
    """:func:`find_leaks` of ``after`` (answers after an edit), leaving out each answer that is the same text as the
    unedited model's answer to the same probe in ``before``: that one the model gives itself ("The answer: ..."), so no
    context put it there. With ``before`` empty (not measured) every leak counts."""
    return [(i, p) for i, p in find_leaks(after) if not (i < len(before) and before[i] == after[i])]

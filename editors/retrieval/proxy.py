"""Routing for proxy mode (``editmem serve --upstream URL``): the memory in front of another OpenAI-compatible server.

:class:`ContextRouter` routes a request's query (a completion's prompt, a chat's last user message) through the store
and the scope classifier, without any model: out of scope the request is left as it is; in scope the edit's context
(the text SERAC puts before a query, :data:`editors.retrieval.augmented.DEFAULT_CONTEXT`) is put in front of the
prompt, or of the last user message. What needs the local model is not available this way: SERAC's trained
counterfactual model, and IKE's demonstrations (they are token-level contexts of the local tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from editors.retrieval.augmented import DEFAULT_CONTEXT, context_template, edit_context
from editors.retrieval.service import Shaping
from editors.retrieval.setup import DEFAULT_SCOPE, load_classifier
from memory.errors import ValidationError
from memory.feed import change_number
from scope.router import Decision, Router


class ContextRouter:
    """Decides, per request, whether an edit is in scope, and rewrites the request's text to carry it."""

    route_name = "serac"  # the route an in-scope answer reports: SERAC's context, the upstream model as the reader

    def __init__(self, store: str, *, scope: str = DEFAULT_SCOPE, threshold: float | None = None, k: int = 5,
                 context: str = DEFAULT_CONTEXT, namespace: str = "default"):
        from memory.store import EditMemory

        classifier = load_classifier(scope, threshold=threshold)
        self.router = Router(EditMemory.open(store, encoder=classifier.encoder, namespace=namespace), classifier, k=k)
        self.template = context_template(context)

    @property
    def memory(self) -> Any:
        return self.router.memory

    def close(self) -> None:
        self.router.memory.close()

    def _decide(self, query: str) -> tuple[Decision, Shaping]:
        d = self.router.route([query])[0]
        change = change_number(self.memory)
        namespace = self.memory.namespace
        if d.edit is None:
            return d, Shaping("base", change, score=d.score, threshold=d.threshold, namespace=namespace)
        return d, Shaping(self.route_name, change, d.edit.id, d.edit.version, d.score, d.threshold, d.edit.prompt,
                          d.edit.target_new, namespace=namespace)

    def completion(self, prompt: str) -> tuple[str, Shaping]:
        """The prompt to forward (the edit's context in front when one is in scope) and what shaped it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValidationError("the prompt must be a non-empty string")
        d, shaping = self._decide(prompt)
        return (prompt if d.edit is None else edit_context(d.edit, self.template) + prompt), shaping

    def chat(self, messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Shaping]:
        """The messages to forward (the edit's context in front of the last user message when it is in scope)."""
        out = [dict(m) for m in messages]
        users = [i for i, m in enumerate(out) if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users or not out[users[-1]]["content"].strip():
            raise ValidationError("messages need a non-empty user message")
        last = users[-1]
        d, shaping = self._decide(out[last]["content"])
        if d.edit is not None:
            out[last]["content"] = edit_context(d.edit, self.template) + out[last]["content"]
        return out, shaping

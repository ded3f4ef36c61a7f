"""Routing for proxy mode (``editmem serve --upstream URL``): the memory in front of another OpenAI-compatible server.

:class:`ContextRouter` routes a request's query (a completion's prompt, a chat's last user message) through the store
and the scope classifier, without any language model (the store, its encoder and the scope classifier are all it
loads): out of scope the request is left as it is; in scope a text context is put in front of the prompt, or of the
last user message:

- ``serac`` (default): the edit as the local path puts it before a query the base model generates from, the upstream
  model being the reader (as SERAC's untrained counterfactual model, the base model itself, is locally). A chat
  request gets the edit as messages before the conversation and a lead in its last user message
  (:data:`editors.retrieval.augmented.CHAT_CONTEXTS`, default ``exchange2-only``, the torch path's); a completion
  gets the edit's text in front of the prompt in a format nothing of which is repeated (``new-fact`` in place of a
  leaky format such as the default ``answer``: :data:`~editors.retrieval.augmented.LEAKY_CONTEXTS`);
- ``ike``: IKE's gated mode as text: the ``demos`` nearest demonstrations of IKE's pool (farthest first), then the
  edit's context (:meth:`editors.methods.ike.IkeModel.prompt_text`, the same rendering). The pool is built (or read
  from its cache) on the first IKE request, with the store's encoder.

What needs the local model is not available this way: SERAC with a trained counterfactual model (its weights differ
from the upstream's), IKE's classic mode only as far as it is the same text (here IKE is gated by the scope
classifier), and anything teacher-forced (scores from logits: the eval harness's metrics).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from editors.retrieval.augmented import (
    CLEAN_GENERATE_CONTEXT,
    DEFAULT_CHAT_CONTEXT,
    DEFAULT_CONTEXT,
    LEAKY_CONTEXTS,
    chat_messages,
    check_chat_context,
    context_template,
    edit_context,
    split_lead,
)
from editors.retrieval.service import Shaping
from editors.retrieval.setup import DEFAULT_SCOPE, load_classifier
from memory.errors import ValidationError
from memory.feed import change_number
from memory.records import EditRecord
from scope.router import Decision, Router

METHODS: tuple[str, ...] = ("serac", "ike")
# IKE's settings a proxy takes (``ike=`` of ContextRouter): demos = demonstrations per prompt (IkeSettings.k).
IKE_OPTIONS: tuple[str, ...] = ("demos", "demo_file", "demo_format", "demo_limit", "kinds", "demo_template",
                                "retrieve")


class ContextRouter:
    """Decides, per request, whether an edit is in scope, and rewrites the request's text to carry it."""

    route_name = "serac"  # the route an in-scope answer reports: SERAC's context, the upstream model as the reader

    def __init__(self, store: str, *, scope: str = DEFAULT_SCOPE, threshold: float | None = None, k: int = 5,
                 context: str = DEFAULT_CONTEXT, method: str = "serac", ike: Mapping[str, Any] | None = None,
                 namespace: str = "default", chat_context: str = DEFAULT_CHAT_CONTEXT):
        from memory.store import EditMemory

        if method not in METHODS:
            raise ValidationError(f"proxy mode routes with one of {', '.join(METHODS)}, got {method!r}")
        unknown = sorted(set(ike or {}) - set(IKE_OPTIONS))
        if unknown:
            raise ValidationError(f"unknown IKE option(s) for proxy mode: {', '.join(unknown)} (known: "
                                  f"{', '.join(IKE_OPTIONS)})")
        classifier = load_classifier(scope, threshold=threshold)
        self.router = Router(EditMemory.open(store, encoder=classifier.encoder, namespace=namespace), classifier, k=k)
        self.template = context_template(context)  # IKE's edit context (its demonstrations' own format)
        self.completion_template = context_template(CLEAN_GENERATE_CONTEXT if context in LEAKY_CONTEXTS else context)
        self.chat_context = check_chat_context(chat_context)
        self.method = method
        self._ike_options = dict(ike or {})
        self._ike: Any = None
        self._ike_lock = threading.Lock()
        if method == "ike":
            self.ike_context  # noqa: B018 (build the pool now: a bad demonstration file fails at start)

    @property
    def memory(self) -> Any:
        return self.router.memory

    def close(self) -> None:
        self.router.memory.close()

    @property
    def ike_context(self) -> Any:
        """The :class:`IkeText` of this router (built once, on first use)."""
        with self._ike_lock:
            if self._ike is None:
                self._ike = IkeText.build(self.memory.encoder, self._ike_options, self.template)
            return self._ike

    def _decide(self, query: str, method: str | None) -> tuple[str, EditRecord | None, Shaping]:
        """The method that answers ``query``, the edit in scope (None: out of scope) and what shaped it."""
        method = method or self.method
        if method not in METHODS:
            raise ValidationError(f"editmem.method must be one of {', '.join(METHODS)}, got {method!r}")
        d: Decision = self.router.route([query])[0]
        change = change_number(self.memory)
        namespace = self.memory.namespace
        if d.edit is None:
            return method, None, Shaping("base", change, score=d.score, threshold=d.threshold, namespace=namespace)
        return method, d.edit, Shaping(method, change, d.edit.id, d.edit.version, d.score, d.threshold,
                                       d.edit.prompt, d.edit.target_new, namespace=namespace)

    def completion(self, prompt: str, method: str | None = None) -> tuple[str, Shaping]:
        """The prompt to forward (the edit's context in front when one is in scope) and what shaped it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValidationError("the prompt must be a non-empty string")
        method, edit, shaping = self._decide(prompt, method)
        if edit is None:
            return prompt, shaping
        if method == "ike":
            return self.ike_context.text(prompt, edit) + prompt, shaping
        return edit_context(edit, self.completion_template) + prompt, shaping

    def chat(self, messages: Sequence[dict[str, Any]], method: str | None = None
             ) -> tuple[list[dict[str, Any]], Shaping]:
        """The messages to forward: in scope, SERAC's chat context (messages before the conversation, its lead in
        front of the last user message); IKE's text in front of the last user message."""
        out = [dict(m) for m in messages]
        users = [i for i, m in enumerate(out) if m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users or not out[users[-1]]["content"].strip():
            raise ValidationError("messages need a non-empty user message")
        last = users[-1]
        method, edit, shaping = self._decide(out[last]["content"], method)
        if edit is None:
            return out, shaping
        if method == "ike":
            out[last]["content"] = self.ike_context.text(out[last]["content"], edit) + out[last]["content"]
            return out, shaping
        before, lead = split_lead(chat_messages(edit, self.chat_context))
        out[last]["content"] = lead + out[last]["content"]
        return before + out, shaping


class IkeText:
    """IKE's in-scope context as text: the nearest demonstrations of a pool, then the edit's own context."""

    def __init__(self, pool: Any, *, n_demos: int, kinds: Sequence[str], demo_template: str, retrieve: str,
                 template: str):
        self.pool, self.n_demos, self.kinds = pool, n_demos, tuple(kinds)
        self.demo_template, self.retrieve, self.template = demo_template, retrieve, template

    @classmethod
    def build(cls, encoder: Any, options: Mapping[str, Any], template: str) -> IkeText:
        from editors.methods.ike import DemoPool, IkeSettings, demo_template_text

        s = IkeSettings(mode="gated", k=int(options.get("demos", IkeSettings.k)),
                        kinds=options.get("kinds", IkeSettings.kinds),
                        demo_template=options.get("demo_template", IkeSettings.demo_template),
                        demos=options.get("demo_file"), demo_format=options.get("demo_format", "auto"),
                        demo_limit=options.get("demo_limit"), retrieve=options.get("retrieve", "query"))
        pool = DemoPool.from_file(s.demos, encoder, format=s.demo_format, limit=s.demo_limit)
        return cls(pool, n_demos=s.k, kinds=s.kinds, demo_template=demo_template_text(s.demo_template),
                   retrieve=s.retrieve, template=template)

    def text(self, query: str, edit: EditRecord) -> str:
        from editors.lm.tokens import completed
        from editors.methods.ike import Demo

        key = query if self.retrieve == "query" else Demo("copy", completed(edit.prompt, edit.target_new),
                                                           edit.target_new, edit.prompt, edit.target_new).text
        hits = self.pool.nearest([key], self.n_demos, self.kinds)[0]
        return ("".join(self.pool.demos[i].render(self.demo_template) for i, _ in reversed(hits))
                + edit_context(edit, self.template))

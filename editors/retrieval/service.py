"""Answer completion and chat requests through the edit memory and say what shaped each answer: what the HTTP
service (``editmem serve``) calls, knowing nothing of HTTP.

:class:`MemoryService` holds one model, its tokenizer and a store. For each request it routes the query (a
completion's prompt, a chat's last user message) through a memory editor opened with
:func:`editors.retrieval.session.open_memory_editor` (SERAC or IKE, opened on first use and kept), and generates
with the base model (out of scope, or ``disable``) or with the edit's context put in front (in scope), the same
conditioning :class:`~editors.retrieval.augmented.AugmentedModel` applies. When the model is an edited model
folder of the store (:meth:`MemoryService.hold`), a query in the scope of an edit its weights hold goes to the model
as it is, with route ``weights``. Model calls run on one worker thread
(:mod:`editors.retrieval.batching`): greedy requests that wait together share one batched generate call, and
queries that wait for the routing lock together are routed in one call.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from editors.lm.tokens import encode_prompt, pad_id
from editors.retrieval.augmented import AugmentedModel
from editors.retrieval.batching import MicroBatcher, TokenStreamer
from editors.retrieval.setup import DEFAULT_SCOPE, MemoryEditor
from editors.retrieval.snapshot import Snapshots
from memory.errors import ValidationError
from memory.feed import change_number
from memory.namespaces import check_namespace
from scope.router import Decision

ROUTES = ("base", "serac", "ike")


@dataclass(frozen=True)
class Limits:
    """Caps on one request; a request over one is refused with a ValidationError naming it."""

    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    max_n: int = 8


@dataclass(frozen=True)
class Sampling:
    """Generation settings of one request. ``temperature`` 0 is greedy decoding (the default here)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True)
class Shaping:
    """What shaped an answer: the route taken, the edit (id, version, prompt, target) and its scope score, the
    classifier's threshold, and the store's change number when it was answered."""

    route: str
    change: int | None
    edit_id: int | None = None
    version: int | None = None
    score: float | None = None
    threshold: float | None = None
    edit_prompt: str | None = None
    target_new: str | None = None
    as_of: int | str | None = None  # the earlier state the query was routed in, when one was asked for
    namespace: str = "default"  # the store namespace the query was routed in

    def to_json(self) -> dict[str, Any]:
        return {"route": self.route, "edit_id": self.edit_id, "version": self.version, "score": self.score,
                "threshold": self.threshold, "change": self.change, "edit_prompt": self.edit_prompt,
                "target_new": self.target_new, "as_of": self.as_of, "namespace": self.namespace}


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (end of text or a stop string) or "length"
    tokens: int


@dataclass(frozen=True)
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    shaping: Shaping

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


@dataclass
class ServiceSettings:
    """How the service answers: the default memory method, the scope classifier and its threshold, candidates per
    query, the methods' own options (as ``editmem ask`` takes them), and the request caps."""

    method: str = "serac"
    scope: str = DEFAULT_SCOPE
    threshold: float | None = None
    k: int = 5
    options: dict[str, Any] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 8  # greedy requests waiting together go through the model as one batch of at most this many
    batch_wait: float = 0.2  # seconds a call waits at most for requests sure to come soon (batching.py)
    namespace: str = "default"  # the store namespace a request that names none is answered from


class MemoryService:
    """Answers requests with ``model`` through the memory on ``store`` (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, store: str, settings: ServiceSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.settings = settings or ServiceSettings()
        if self.settings.method not in ROUTES[1:]:
            raise ValidationError(f"method must be one of {', '.join(ROUTES[1:])}, got {self.settings.method!r}")
        self._editors: dict[tuple[str, str], MemoryEditor] = {}  # (namespace, method) -> its editor
        self._lock = threading.Lock()  # routing (the editors' caches are not thread-safe)
        self._asks: dict[tuple[str, str], list[_Ask]] = {}  # (namespace, method) -> queries waiting to be routed
        self._asks_lock = threading.Lock()
        self.routed_batches = 0  # routing calls made (queries that waited together count once)
        self._batcher = MicroBatcher(pad_id(tokenizer), max_batch=self.settings.max_batch,
                                     max_wait=self.settings.batch_wait)
        self._snapshots = Snapshots()
        self.held: Any = None  # the edits the model's own weights hold (scope.router.HeldEdits): see hold()

    def hold(self, held: Any) -> None:
        """Leave the edits ``held`` (:class:`scope.router.HeldEdits`: the served model is an edited model folder of
        the store) to the model's weights: every router, open now or later, stops gating them; their answers say
        route ``weights``."""
        self.held = held
        for editor in self._editors.values():
            editor.model.router.held = held

    # --- editors ------------------------------------------------------------------------------------------------------
    def editor(self, method: str | None = None, namespace: str | None = None) -> MemoryEditor:
        """The memory editor for ``method`` (default: the service's) over the store's ``namespace`` (default: the
        service's), opened on first use and kept: one per namespace and method, so a query in one namespace is only
        ever routed to that namespace's edits."""
        method = method or self.settings.method
        if method not in ROUTES[1:]:
            raise ValidationError(f"editmem.method must be one of {', '.join(ROUTES[1:])}, got {method!r}")
        namespace = check_namespace(namespace or self.settings.namespace)
        editor = self._editors.get((namespace, method))
        if editor is None:
            from editors.retrieval.session import open_memory_editor

            s = self.settings
            editor = open_memory_editor(method, self.store, self.model, self.tokenizer, scope=s.scope,
                                        threshold=s.threshold, k=s.k, namespace=namespace,
                                        **s.options.get(method, {}))
            editor.model.router.held = self.held
            self._editors[(namespace, method)] = editor
        return editor

    @property
    def context_length(self) -> int | None:
        """The most tokens (prompt and answer) the model takes, from its config; None when it does not say."""
        value = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    @property
    def namespaces(self) -> set[str]:
        """The namespaces an editor is open for."""
        return {namespace for namespace, _ in self._editors}

    @property
    def batcher(self) -> MicroBatcher:
        return self._batcher

    def close(self) -> None:
        self._batcher.close()
        self._snapshots.close()
        for editor in self._editors.values():
            editor.memory.close()
        self._editors.clear()

    # --- prompts ------------------------------------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, str]:
        """The prompt text for chat ``messages`` (the tokenizer's chat template with the assistant's turn opened, or
        the contents joined by newlines when it has none) and the text to route on (the last user message)."""
        if not messages:
            raise ValidationError("messages must not be empty")
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users or not users[-1].strip():
            raise ValidationError("messages need a non-empty user message")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        return str(text), users[-1]

    # --- answering ----------------------------------------------------------------------------------------------------
    def complete(self, prompt: str, sampling: Sampling, *, route_text: str | None = None, method: str | None = None,
                 disable: bool = False, templated: bool = False, as_of: int | str | None = None,
                 namespace: str | None = None) -> Completion:
        """``sampling.n`` continuations of ``prompt``, routed on ``route_text`` (default: the prompt) through the
        memory editor ``method`` (default: the service's), or by the base model alone with ``disable``.
        ``templated``: the prompt already carries the chat template's special tokens (no BOS is added).
        ``as_of``: route as the store stood at that change number or ISO time (:mod:`editors.retrieval.snapshot`).
        ``namespace``: the store namespace whose edits the query is routed to (default: the service's)."""
        self._batcher.announce()  # a generate call starting while this request is routed waits for it
        try:
            plan = self._plan(prompt, sampling, route_text=route_text, method=method, disable=disable,
                              templated=templated, as_of=as_of, namespace=namespace)
        except BaseException:
            self._batcher.withdraw()
            raise
        return Completion(self._generate(plan.lm, plan.seq, plan.sampling, plan.start), plan.prompt_tokens,
                          plan.shaping)

    def stream(self, prompt: str, sampling: Sampling, **options: Any) -> Iterator[str | Completion]:
        """Like :meth:`complete` for one answer (``sampling.n`` must be 1), as it is generated: the new text piece
        by piece (held back while it could be the start of a stop string), then the :class:`Completion`. The request
        is checked and routed before this returns, so errors are raised here, not while iterating."""
        if sampling.n != 1:
            raise ValidationError("a streamed answer has n = 1 here")
        return self._stream(self._plan(prompt, sampling, **options))

    def _plan(self, prompt: str, sampling: Sampling, *, route_text: str | None = None, method: str | None = None,
              disable: bool = False, templated: bool = False, as_of: int | str | None = None,
              namespace: str | None = None) -> _Plan:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValidationError("the prompt must be a non-empty string")
        self._check(sampling)
        row = (list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) if templated
               else encode_prompt(self.tokenizer, prompt))
        limit = self.settings.limits.max_prompt_tokens
        if len(row) > limit:
            raise ValidationError(f"the prompt has {len(row)} tokens; this server takes at most {limit}")
        context = self.context_length
        if context is not None and len(row) + sampling.max_tokens > context:
            raise ValidationError(f"the prompt ({len(row)} tokens) and max_tokens ({sampling.max_tokens}) exceed the "
                                  f"model's context of {context} tokens")
        start: list[int] = []
        if disable:
            with self._lock:
                seq, lm = row, self.model
                ns = check_namespace(namespace or self.settings.namespace)
                editor = self._editors.get((ns, method or self.settings.method))
                change = change_number(editor.memory) if editor is not None else None
                shaping = Shaping("base", change, namespace=ns)
        else:
            key = (check_namespace(namespace or self.settings.namespace), method or self.settings.method)
            ask = None if as_of is not None else self._ask(key, route_text or prompt)
            with self._lock:
                try:
                    editor = self.editor(method, namespace)
                except BaseException:
                    self._drop(key, ask)
                    raise
                wrapper = cast(AugmentedModel, editor.model)
                if as_of is not None:
                    decision = self._snapshots.route(editor, as_of, route_text or prompt)
                else:
                    assert ask is not None
                    decision = self._answer_asks(key, editor, ask)
                if decision.edit is not None:
                    seq, lm = wrapper.condition_row(row, decision.edit), wrapper.counterfactual_for(row)
                    start = wrapper.reply_start(row)
                    if len(start) < sampling.max_tokens:  # the reply's start counts in its token budget
                        seq = seq + start
                        sampling = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - len(start))
                    else:
                        start = []
                else:
                    seq, lm = row, self.model
                route = editor.name if decision.in_scope else "weights" if decision.weights is not None else "base"
                shaping = _shaping(route, decision,
                                   change_number(editor.memory), as_of, editor.memory.namespace)
        if context is not None and len(seq) + sampling.max_tokens > context:  # the edit's context made it longer
            sampling = dataclasses.replace(sampling, max_tokens=max(1, context - len(seq)))
        return _Plan(len(row), seq, lm, shaping, sampling, tuple(start))

    def _ask(self, key: tuple[str, str], text: str) -> _Ask:
        """Put ``text`` among the queries waiting to be routed by the editor of ``key`` (namespace, method)."""
        ask = _Ask(text)
        with self._asks_lock:
            self._asks.setdefault(key, []).append(ask)
        return ask

    def _drop(self, key: tuple[str, str], ask: _Ask | None) -> None:
        with self._asks_lock:
            waiting = self._asks.get(key, [])
            if ask in waiting:
                waiting.remove(ask)
            if not waiting:
                self._asks.pop(key, None)

    def _answer_asks(self, key: tuple[str, str], editor: MemoryEditor, ask: _Ask) -> Decision:
        """``ask``'s routing decision. Called holding the routing lock: if no other request has routed ``ask``
        yet, every query waiting for ``key``'s ``editor`` is routed now in one call (one encoder batch, one index
        search), so concurrent requests do not each pay for their own."""
        if ask.decision is None and ask.error is None:
            with self._asks_lock:
                waiting = self._asks.pop(key, [])
            try:
                decisions = cast(AugmentedModel, editor.model).route([a.text for a in waiting])
                for a, decision in zip(waiting, decisions, strict=True):
                    a.decision = decision
            except BaseException as err:  # every query of the batch gets the error
                for a in waiting:
                    a.error = err
            self.routed_batches += 1
        if ask.error is not None:
            raise ask.error
        assert ask.decision is not None
        return ask.decision

    def _stream(self, plan: _Plan) -> Iterator[str | Completion]:
        s = plan.sampling
        streamer = TokenStreamer()
        job = self._batcher.submit(plan.lm, plan.seq, s.max_tokens, 1, _sampling_kwargs(s), streamer=streamer)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        hold = max((len(x) for x in s.stop), default=1) - 1
        tokens: list[int] = list(plan.start)
        sent, finish, stopped = "", "length", False
        while True:
            token = streamer.tokens.get()
            if token is None:
                break
            if eos is not None and token == eos:
                finish = "stop"
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _first_stop(text, s.stop)
            if cut >= 0:
                text, finish, stopped = text[:cut], "stop", True
                break
            safe = len(text) - hold - (1 if text.endswith("\ufffd") else 0)  # an unfinished character waits too
            if safe > len(sent):
                yield text[len(sent):safe]
                sent = text[:safe]
        if not stopped:
            self._batcher.wait(job)  # raises the generate call's error, if any
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(sent):
            yield text[len(sent):]
        count = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if stopped else len(tokens)
        yield Completion([Choice(text, finish, count)], plan.prompt_tokens, plan.shaping)

    def _check(self, s: Sampling) -> None:
        limits = self.settings.limits
        if isinstance(s.max_tokens, bool) or not isinstance(s.max_tokens, int) or s.max_tokens < 1:
            raise ValidationError(f"max_tokens must be a positive integer, got {s.max_tokens!r}")
        if s.max_tokens > limits.max_tokens:
            raise ValidationError(f"max_tokens is {s.max_tokens}; this server allows at most {limits.max_tokens}")
        if isinstance(s.n, bool) or not isinstance(s.n, int) or s.n < 1:
            raise ValidationError(f"n must be a positive integer, got {s.n!r}")
        if s.n > limits.max_n:
            raise ValidationError(f"n is {s.n}; this server allows at most {limits.max_n}")
        if not 0.0 <= s.temperature <= 2.0:
            raise ValidationError(f"temperature must be between 0 and 2, got {s.temperature}")
        if not 0.0 < s.top_p <= 1.0:
            raise ValidationError(f"top_p must be in (0, 1], got {s.top_p}")
        if len(s.stop) > 4 or not all(isinstance(x, str) and x for x in s.stop):
            raise ValidationError("stop takes at most 4 non-empty strings")

    def _generate(self, lm: Any, seq: list[int], s: Sampling, start: Sequence[int] = ()) -> list[Choice]:
        rows = self._batcher.wait(self._batcher.submit(lm, seq, s.max_tokens, s.n, _sampling_kwargs(s),
                                                       announced=True))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        choices = []
        for generated in rows:
            tokens, finish = [*start, *generated], "length"
            if eos is not None and eos in tokens:
                tokens, finish = tokens[:tokens.index(eos)], "stop"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = _first_stop(text, s.stop)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            choices.append(Choice(text, finish, len(tokens)))
        return choices


@dataclass(eq=False)
class _Ask:
    """A query waiting to be routed, and its decision (or error) once some request has routed the waiting ones."""

    text: str
    decision: Decision | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _Plan:
    """A checked, routed request: what to generate from, with which model, and what shaped it."""

    prompt_tokens: int
    seq: list[int]
    lm: Any
    shaping: Shaping
    sampling: Sampling
    start: tuple[int, ...] = ()  # the reply's first tokens, given (AugmentedModel.reply_start), not generated


def _sampling_kwargs(s: Sampling) -> dict[str, Any]:
    if s.temperature > 0:
        return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0, "seed": s.seed}
    return {}


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the first stop string begins in ``text``; -1 if none occurs."""
    return min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)


def _shaping(route: str, decision: Decision, change: int, as_of: int | str | None, namespace: str) -> Shaping:
    edit = decision.edit or decision.weights  # route "weights": the edit the model's own weights answered
    return Shaping(route, change, edit.id if edit else None, edit.version if edit else None,
                   None if decision.score is None else float(decision.score), float(decision.threshold),
                   edit.prompt if edit else None, edit.target_new if edit else None, as_of, namespace)

"""``ike``: in-context knowledge editing (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?").

Demonstrations. A pool built from a training file of edit cases (default ``counterfact-train.json``): for each case
with new fact f (its prompt followed by its new target) three kinds:

- **copy**: the prompt is f's own prompt and the answer f's new target;
- **update**: the prompt is a rephrase of f's prompt, the answer still the new target (one per rephrase);
- **retain**: the prompt is one of the case's locality (neighbourhood) prompts and the answer its original answer, so
  the model sees that a new fact leaves unrelated facts alone.

A demonstration is written with a template (``demo_template``): ``paper`` is the paper's
``"New Fact: {f}\\nPrompt: {prompt} {answer}\\n\\n"``; ``answer`` (default) adds the new target as a hint,
``"New Fact: {f} (answer: {new target})\\n..."``, as the edit's own default context does, so that demonstrations and
the edit read alike. Which kinds are retrieved is a setting (``kinds``); the default leaves retain demonstrations
out: on SmolLM2-135M they cost reliability and bought no locality (notes/memory_editing.md, section IKE).

A FAISS index (:class:`memory.index.VectorIndex`, flat inner product) holds the pool's embeddings (of the paper's
rendering, whatever the template) by the store's encoder; it is cached under ``$EDITMEM_CACHE/ike/`` keyed by the pool
file's content hash, the pool layout version and the encoder, since encoding 30,000 demonstrations with MiniLM takes
minutes on a CPU.

Prompt. For a query in the scope of a stored edit: the ``k`` demonstrations nearest to the query (``retrieve="query"``)
or to the edit's new fact (``retrieve="fact"``, as EasyEdit's IKE does), farthest first so the nearest sits next to the
query, then the edit's own context (a format of :data:`editors.retrieval.augmented.CONTEXT_FORMATS`; default
``answer``: a copy demonstration of the edit and ``New Fact: {f} (answer: {new target})\\nPrompt: ``), then the query.
A chat row (a question through the chat template) gets the edit's chat context instead, with the demonstrations as
worked examples in its system message (``chat_demos="system"``, :func:`with_examples`) or as exchanges after it.
The wrapper, its routing, the context insertion after BOS and the read-back of logits at the original positions are
:class:`editors.retrieval.augmented.AugmentedModel`'s; this module only decides what context a row gets.

Modes. ``classic`` (as in the paper): every query gets the context of the nearest stored edit by the store's search (a
cosine scope whose threshold no similarity can miss), whatever it asks; only an empty store leaves the base model
alone. ``gated``: the scope classifier (the same one SERAC uses, :func:`editors.methods.serac.load_classifier`)
decides; out of scope queries are answered by the untouched base model, bit for bit.

``apply(requests)`` inserts the edits into the store and returns SERAC's
:class:`editors.methods.serac.MemoryEditHandle`; ``restore()`` deletes exactly those edits. The base model's weights
are never touched.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from editors.base import (
    EditorSettings,
    register_editor,
)
from editors.lm.tokens import completed
from editors.retrieval.augmented import (
    CLOZE_REPLIES,
    DEFAULT_CLOZE_REPLY,
    AugmentedModel,
    context_template,
    edit_context,
    insert_context,
)
from editors.retrieval.setup import DEFAULT_SCOPE, MemoryEditor, load_classifier
from memory.checks import check_choice
from memory.encoder import DEFAULT_ENCODER, encode_chunked
from memory.errors import EditmemError, ValidationError
from memory.namespaces import check_namespace
from memory.paths import cache_subdir
from memory.records import EditCase, EditRecord
from scope.router import Decision

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("classic", "gated")
RETRIEVE: tuple[str, ...] = ("query", "fact")
DEMO_KINDS: tuple[str, ...] = ("copy", "update", "retain")
# How a chat row gets its demonstrations: "system", as worked examples in the edit's system message; "exchanges", as
# user/assistant turns after it. With "exchanges", SmolLM2-135M often answered with the demonstration's target
# ("... employed in Dresden", the demonstration's, for the edit's Paris). Generated answers, SmolLM2-135M-Instruct:
# on CounterFact cases 60-99 reliability 39 / 39 of 40, generalization 22 / 26 ("exchanges" / "system"); of the 11 edit
# prompts "exchanges" missed in cases 0-123, "system" answers 7 (notes/answers.md, round 6).
CHAT_DEMOS: tuple[str, ...] = ("system", "exchanges")
DEFAULT_CHAT_DEMOS = "system"
# Fields: {fact} (the new fact), {target_new} (its new target), {query} (the demonstration's prompt and answer).
DEMO_TEMPLATES: dict[str, str] = {
    "paper": "New Fact: {fact}\nPrompt: {query}\n\n",
    "answer": "New Fact: {fact} (answer: {target_new})\nPrompt: {query}\n\n",
}
DEFAULT_DEMO_FILE = Path("counterfact") / "easyedit_split" / "counterfact-train.json"
# Bump when the pool's layout (which demonstrations, in which order, rendered how) changes: it keys the index cache.
POOL_LAYOUT = 1
# A cosine scope with this threshold takes the nearest stored edit for every query (cosines are >= -1).
_ALWAYS = -2.0


def default_demo_file() -> Path:
    """``counterfact-train.json`` under ``$EDITMEM_DATA``, else under ``../shared/data`` beside the repository."""
    root = os.environ.get("EDITMEM_DATA")
    base = Path(root).expanduser() if root else Path(__file__).resolve().parents[3] / "shared" / "data"
    return base / DEFAULT_DEMO_FILE


def cache_root() -> Path:
    """Where demonstration indexes are cached: ``$EDITMEM_CACHE/ike`` (default ``~/.cache/editmem/ike``)."""
    return cache_subdir("ike")


@dataclass(frozen=True)
class IkeSettings(EditorSettings):
    """Settings of :class:`IkeEditor`.

    ``mode``: ``classic`` or ``gated`` (module docstring). ``k``: demonstrations per prompt (0: none, only the
    edit's context). ``kinds``: which kinds are retrieved (of copy, update, retain). ``demo_template``: a name of
    :data:`DEMO_TEMPLATES` or a template with ``{query}``. ``demos``: the demonstration pool file (default
    :func:`default_demo_file`); ``demo_format``: its format (:mod:`memory.formats`, default auto-detect);
    ``demo_limit``: use only its first N cases. ``retrieve``: what the demonstrations are retrieved by, ``query`` or
    the edit's ``fact``. ``context``: the edit's own context, a format name of
    :data:`editors.retrieval.augmented.CONTEXT_FORMATS` or a template. ``store``: store URL (default an in-memory
    SQLite store of the editor's own). ``scope``, ``threshold``: the scope classifier of ``gated`` mode, as SERAC's.
    ``encoder``: the store's and the pool's encoder (default: the classifier's in gated mode, MiniLM in classic).
    ``candidates``: stored edits retrieved per query for the scope classifier. ``namespace``: the store namespace of
    the edits. ``cloze_reply``: as SERAC's (:data:`editors.retrieval.augmented.CLOZE_REPLIES`). ``chat_demos``: how
    a chat row gets its demonstrations (:data:`CHAT_DEMOS`).
    """

    mode: str = "classic"
    k: int = 1
    kinds: tuple[str, ...] = ("copy", "update")
    demo_template: str = "answer"
    demos: str | None = None
    demo_format: str = "auto"
    demo_limit: int | None = None
    retrieve: str = "query"
    context: str = "answer"
    store: str = "sqlite://"
    scope: str = DEFAULT_SCOPE
    threshold: float | None = None
    encoder: str | None = None
    candidates: int = 5
    namespace: str = "default"
    cloze_reply: str = DEFAULT_CLOZE_REPLY
    chat_demos: str = DEFAULT_CHAT_DEMOS

    def __post_init__(self) -> None:
        check_choice("ike", "cloze_reply", self.cloze_reply, CLOZE_REPLIES)
        check_choice("ike", "chat_demos", self.chat_demos, CHAT_DEMOS)
        if self.mode not in MODES:
            raise ValidationError(f"ike setting mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValidationError(f"ike setting k (demonstrations per prompt) must be an integer >= 0, got {self.k!r}")
        kinds = tuple(k.strip() for k in self.kinds.split(",")) if isinstance(self.kinds, str) else self.kinds
        if not isinstance(kinds, (tuple, list)) or not kinds or any(k not in DEMO_KINDS for k in kinds) \
                or len(set(kinds)) != len(kinds):
            raise ValidationError(f"ike setting kinds must name demonstration kinds among {', '.join(DEMO_KINDS)} "
                                  f"(each once), got {self.kinds!r}")
        object.__setattr__(self, "kinds", tuple(kinds))
        demo_template_text(self.demo_template)
        if self.demos is not None and (not isinstance(self.demos, (str, os.PathLike)) or not str(self.demos)):
            raise ValidationError(f"ike setting demos must be the path of a data file, got {self.demos!r}")
        if not isinstance(self.demo_format, str) or not self.demo_format:
            raise ValidationError(f"ike setting demo_format must be a format name, got {self.demo_format!r}")
        if self.demo_limit is not None and (isinstance(self.demo_limit, bool) or not isinstance(self.demo_limit, int)
                                            or self.demo_limit < 1):
            raise ValidationError(f"ike setting demo_limit must be a positive integer or None, got "
                                  f"{self.demo_limit!r}")
        if self.retrieve not in RETRIEVE:
            raise ValidationError(f"ike setting retrieve must be one of {', '.join(RETRIEVE)}, got "
                                  f"{self.retrieve!r}")
        if not isinstance(self.store, str) or not self.store:
            raise ValidationError(f"ike setting store must be a store URL, got {self.store!r}")
        check_namespace(self.namespace)
        if not isinstance(self.scope, str) or not self.scope:
            raise ValidationError(f"ike setting scope must be a classifier name or 'cosine', got {self.scope!r}")
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise ValidationError(f"ike setting threshold must be a number or None, got {self.threshold!r}")
        if self.encoder is not None and not isinstance(self.encoder, str):
            raise ValidationError(f"ike setting encoder must be an encoder name, got {self.encoder!r}")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 1:
            raise ValidationError(f"ike setting candidates must be a positive integer, got {self.candidates!r}")
        context_template(self.context)


# --- demonstrations ---------------------------------------------------------------------------------------------------
def demo_template_text(template: str) -> str:
    """The template of a name in :data:`DEMO_TEMPLATES`, or ``template`` itself if it is one (has ``{query}``)."""
    if template in DEMO_TEMPLATES:
        return DEMO_TEMPLATES[template]
    if not isinstance(template, str) or "{query}" not in template:
        raise ValidationError(f"ike setting demo_template must be one of {', '.join(DEMO_TEMPLATES)} or a template "
                              f"containing {{query}}, got {template!r}")
    try:
        template.format(fact="", target_new="", query="")
    except (KeyError, IndexError, ValueError) as err:
        raise ValidationError(f"ike setting demo_template {template!r} is malformed: {err}") from None
    return template


def example_text(demos: Sequence[Demo]) -> str:
    """Demonstrations as worked examples for a system message, one sentence in parentheses each."""
    return " ".join(f'(Example: given "{d.fact}", "{d.prompt}" is completed as "{d.query}".)' for d in demos)


def with_examples(messages: Sequence[dict[str, str]], demos: Sequence[Demo]) -> list[dict[str, str]]:
    """``messages`` (a chat context) with ``demos`` as examples in the first system message, after its first
    sentence (the assistant's role), before the fact; a system message of its own in front where there is none."""
    out = [dict(m) for m in messages]
    examples = example_text(demos)
    for m in out:
        if m["role"] == "system":
            head, sep, tail = m["content"].partition(". ")
            m["content"] = f"{head}. {examples} {tail}" if sep else f"{examples} {m['content']}"
            return out
    return [{"role": "system", "content": examples}, *out]


@dataclass(frozen=True)
class Demo:
    """One demonstration: under new fact ``fact`` (whose new target is ``target_new``), ``prompt`` is completed by
    ``answer``."""

    kind: str  # one of DEMO_KINDS
    fact: str
    target_new: str
    prompt: str
    answer: str
    case_id: str | None = None

    @property
    def query(self) -> str:
        return completed(self.prompt, self.answer)

    def render(self, template: str = DEMO_TEMPLATES["paper"]) -> str:
        return template.format(fact=self.fact, target_new=self.target_new, query=self.query)

    @property
    def text(self) -> str:
        """The paper's rendering; what the index embeds."""
        return self.render()


def build_demos(cases: Sequence[EditCase]) -> list[Demo]:
    """The pool, in a fixed order: for each case its copy, then one update per rephrase, then one retain per locality
    probe."""
    demos: list[Demo] = []
    for case in cases:
        fact = completed(case.prompt, case.target_new)
        new = case.target_new
        demos.append(Demo("copy", fact, new, case.prompt, new, case.case_id))
        demos += [Demo("update", fact, new, r, new, case.case_id) for r in case.rephrases if r.strip()]
        demos += [Demo("retain", fact, new, p.prompt, p.answer, case.case_id) for p in case.locality
                  if p.prompt.strip() and p.answer.strip()]
    return demos


class DemoPool:
    """The demonstrations and a FAISS index over their embeddings (ids are positions in ``demos``)."""

    def __init__(self, demos: Sequence[Demo], encoder: Any, index: Any, source: str = ""):
        if len(demos) != len(index):
            raise EditmemError(f"demonstration index holds {len(index)} vectors for {len(demos)} demonstrations")
        self.demos = list(demos)
        self.encoder = encoder
        self.index = index
        self.source = source

    @classmethod
    def build(cls, demos: Sequence[Demo], encoder: Any, *, cache_key: str | None = None,
              source: str = "") -> DemoPool:
        """Encode ``demos`` and index them; with ``cache_key`` the index is read from / written to the cache."""
        from memory.index import IndexHeader, VectorIndex

        path = None
        uid = f"ike-demos-{cache_key or 'uncached'}-n{len(demos)}"
        if cache_key is not None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)[-60:]
            path = cache_root() / f"{cache_key}-n{len(demos)}-{slug}.faiss"
            index = VectorIndex.load(path)
            if index is not None and index.store_uid == uid and index.encoder == encoder.name \
                    and index.dim == encoder.dim and len(index) == len(demos):
                log.info("IKE demonstrations: %d from the cache %s", len(demos), path)
                return cls(demos, encoder, index, source)
        index = VectorIndex(IndexHeader(store_uid=uid, encoder=encoder.name, dim=encoder.dim, kind="flat", seq=0))
        if demos:
            # the first run on a pool encodes all of it (minutes for 30,000 with MiniLM on a CPU): say so up front
            log.log(logging.WARNING if len(demos) > 1000 else logging.INFO,
                    "IKE demonstrations: encoding %d with %s (once; cached as %s)", len(demos), encoder.name,
                    path if path is not None else "nothing")
            vectors = encode_chunked(encoder, [d.text for d in demos], progress=len(demos) > 5000,
                                     desc="encoding IKE demonstrations")
            index.add(np.arange(len(demos), dtype=np.int64), vectors)
        if path is not None:
            index.save(path)
        return cls(demos, encoder, index, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None, encoder: Any, *, format: str = "auto",
                  limit: int | None = None) -> DemoPool:
        """The pool of a data file of edit cases (CounterFact, zsRE, ... as :mod:`memory.formats` reads them)."""
        from memory.formats import read_cases

        file = Path(path).expanduser() if path is not None else default_demo_file()
        if not file.is_file():
            how = "give ike.demos=FILE" if path is not None else \
                "set EDITMEM_DATA to the data folder or give ike.demos=FILE"
            raise EditmemError(f"IKE demonstration file not found: {file} ({how}; the default is "
                               f"{DEFAULT_DEMO_FILE} under the data folder)")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
        cases = read_cases(file, format)
        if limit is not None:
            cases = cases[:limit]
        demos = build_demos(cases)
        if not demos:
            raise EditmemError(f"{file}: no demonstrations could be built (no edit cases)")
        key = f"{digest}-l{POOL_LAYOUT}"
        return cls.build(demos, encoder, cache_key=key, source=str(file))

    def __len__(self) -> int:
        return len(self.demos)

    def nearest(self, texts: Sequence[str], k: int,
                kinds: Sequence[str] = DEMO_KINDS) -> list[list[tuple[int, float]]]:
        """For each text the ``k`` nearest demonstrations of ``kinds``, as (position, cosine), nearest first."""
        if k <= 0 or not texts:
            return [[] for _ in texts]
        wanted = set(kinds)
        vectors = self.encoder.encode(list(texts))
        depth = k if wanted >= set(DEMO_KINDS) else 4 * k
        while True:  # search deeper until k of the wanted kinds are found (or the pool is exhausted)
            scores, ids = self.index.search(vectors, depth)
            rows = [[(int(i), float(s)) for i, s in zip(row_ids, row_scores)
                     if i >= 0 and self.demos[int(i)].kind in wanted][:k] for row_ids, row_scores in zip(ids, scores)]
            if depth >= len(self.demos) or all(len(r) == k for r in rows):
                return rows
            depth = min(len(self.demos), depth * 4)


# --- the wrapper ------------------------------------------------------------------------------------------------------
class IkeModel(AugmentedModel):
    """:class:`AugmentedModel` whose context for an in-scope row is the retrieved demonstrations plus the edit's own.

    After every call ``last_demos`` holds, per row, the (position, cosine) of the demonstrations put in its context
    (empty for rows the base model answered); ``demo(i)`` is the demonstration at a position.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, memory: Any, scope: Any, pool: DemoPool, *,
                 n_demos: int, kinds: Sequence[str] = ("copy", "update"), demo_template: str = "answer",
                 retrieve: str = "query", k: int = 5, context: str = "answer",
                 cloze_reply: str = DEFAULT_CLOZE_REPLY, chat_demos: str = DEFAULT_CHAT_DEMOS):
        super().__init__(model, tokenizer, memory, scope, k=k, context=context, cloze_reply=cloze_reply)
        check_choice("ike", "chat_demos", chat_demos, CHAT_DEMOS)
        self.chat_demos = chat_demos
        self.pool = pool
        self.n_demos = n_demos
        self.kinds = tuple(kinds)
        self.demo_template = demo_template_text(demo_template)
        self.retrieve = retrieve
        self.last_demos: list[tuple[tuple[int, float], ...]] = []
        self._planned: dict[tuple[tuple[int, ...], int, int], tuple[int, ...]] = {}
        self._ctx_cache: OrderedDict[tuple[tuple[int, ...], int, int], list[int]] = OrderedDict()

    def demo(self, position: int) -> Demo:
        return self.pool.demos[position]

    def explain(self, row: int = 0) -> list[str]:
        """The demonstrations put before row ``row``'s edit in the last call, one line each."""
        lines = []
        for rank, (position, cosine) in enumerate(self.last_demos[row] if row < len(self.last_demos) else (), 1):
            demo = self.demo(position)
            lines.append(f"demonstration {rank} ({demo.kind}, case {demo.case_id}, cosine {cosine:.3f}): "
                         f"New Fact: {demo.fact} | Prompt: {demo.prompt} -> {demo.answer}")
        return lines

    def _retrieval_texts(self, decisions: Sequence[Decision]) -> list[str]:
        if self.retrieve == "fact":
            return [Demo("copy", completed(d.chosen.prompt, d.chosen.target_new), d.chosen.target_new, d.chosen.prompt,
                         d.chosen.target_new).text for d in decisions]
        return [d.query for d in decisions]

    def route_rows(self, rows: Sequence[Sequence[int]]) -> list[Decision]:
        decisions = super().route_rows(rows)
        inside = [b for b, d in enumerate(decisions) if d.in_scope]
        found = self.pool.nearest(self._retrieval_texts([decisions[b] for b in inside]), self.n_demos, self.kinds)
        self.last_demos = [() for _ in rows]
        self._planned = {}
        for b, hits in zip(inside, found):
            self.last_demos[b] = tuple(hits)
            edit = decisions[b].chosen
            self._planned[(tuple(rows[b]), edit.id, edit.version)] = tuple(i for i, _ in hits)
        return decisions

    def _demo_ids(self, row: list[int], edit: EditRecord) -> tuple[int, ...]:
        planned = self._planned.get((tuple(row), edit.id, edit.version))
        if planned is not None:
            return planned
        decision = Decision(self.row_text(row), edit, None, self.scope.threshold)
        return tuple(i for i, _ in self.pool.nearest(self._retrieval_texts([decision]), self.n_demos, self.kinds)[0])

    def prompt_text(self, demo_ids: Sequence[int], edit: EditRecord) -> str:
        """The context put before a query: the demonstrations (nearest last) and then the edit's own context."""
        return ("".join(self.pool.demos[i].render(self.demo_template) for i in reversed(demo_ids))
                + edit_context(edit, self.template))

    def chat_messages(self, row: list[int], edit: EditRecord) -> list[dict[str, str]]:
        """For a chat row, the edit's chat context with the demonstrations (nearest last) put in: as worked examples
        in its system message (``chat_demos="system"``) or as exchanges after it (``"exchanges"``)."""
        own = super().chat_messages(row, edit)
        demos = [self.pool.demos[i] for i in reversed(self._demo_ids(row, edit))]
        if not demos:
            return own
        if self.chat_demos == "system":
            return with_examples(own, demos)
        system = [m for m in own if m["role"] == "system"]
        exchanges = []
        for demo in demos:
            exchanges += [{"role": "user", "content": f"{demo.fact}. {demo.prompt}"},
                          {"role": "assistant", "content": f"{demo.query}."}]
        return [*system, *exchanges, *[m for m in own if m["role"] != "system"]]

    def _conditioned(self, row: list[int], edit: EditRecord, *, generating: bool = False) -> tuple[list[int], int]:
        # Plain rows keep IKE's demonstration format whether generating or not (its demonstrations are that format);
        # chat rows (editors.lm.chat) get a conversation instead (chat_messages).
        chat = self._chat_conditioned(row, edit)
        if chat is not None:
            return chat
        demo_ids = self._demo_ids(row, edit)
        key = (demo_ids, edit.id, edit.version)
        ctx = self._ctx_cache.get(key)
        if ctx is None:
            ctx = list(self.tokenizer(self.prompt_text(demo_ids, edit), add_special_tokens=False)["input_ids"])
            self._ctx_cache[key] = ctx
            while len(self._ctx_cache) > 4096:
                self._ctx_cache.popitem(last=False)
        return insert_context(row, ctx, self._lead)


@register_editor
class IkeEditor(MemoryEditor):
    """Edits go into a store; queries get the edit and its nearest demonstrations in context (module docstring)."""

    name = "ike"
    label = "IKE"
    Settings = IkeSettings
    settings: IkeSettings

    def __init__(self, model: torch.nn.Module, tokenizer: Any, settings: IkeSettings | None = None):
        super().__init__(model, tokenizer, settings)
        from scope.classifier import CosineScope

        s = self.settings
        if s.mode == "gated":
            clf = load_classifier(s.scope, threshold=s.threshold)
            encoder_name = s.encoder or clf.encoder or DEFAULT_ENCODER
            candidates = s.candidates
        else:
            clf = CosineScope(_ALWAYS, None, {"name": "ike-classic"})
            encoder_name = s.encoder or DEFAULT_ENCODER
            candidates = 1  # the nearest stored edit is the best-scoring candidate
        self.open_memory(s.store, encoder_name, clf, namespace=s.namespace)
        self.pool = DemoPool.from_file(s.demos, self.memory.encoder, format=s.demo_format, limit=s.demo_limit)
        self._wrapper = IkeModel(model, tokenizer, self.memory, clf, self.pool, n_demos=s.k, kinds=s.kinds,
                                 demo_template=s.demo_template, retrieve=s.retrieve, k=candidates,
                                 context=s.context, cloze_reply=s.cloze_reply, chat_demos=s.chat_demos)

    @classmethod
    def scope_in_use(cls, settings: Any) -> str | None:
        """Only ``gated`` mode loads a scope classifier."""
        return settings.scope if settings.mode == "gated" else None

    @classmethod
    def query_settings(cls, *, store: str, encoder: str, scope: str, threshold: float | None, k: int,
                       **options: Any) -> dict[str, Any]:
        """``k`` is IKE's candidate count; ``demos`` its number of demonstrations (its own ``k``), ``demo_file`` its
        pool file, ``mode`` classic or gated."""
        settings: dict[str, Any] = {"store": store, "encoder": encoder, "scope": scope, "threshold": threshold,
                                    "candidates": k}
        renamed = {"demos": "k", "demo_file": "demos"}
        settings.update({renamed.get(key, key): value for key, value in options.items() if value is not None})
        return settings

    @property
    def model(self) -> IkeModel:
        assert isinstance(self._wrapper, IkeModel)  # built so in __init__
        return self._wrapper

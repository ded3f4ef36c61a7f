"""`editmem demo`: the main job, a short walk through the store that a new user can watch.

It creates a store in a temporary folder (or uses ``--store`` / ``EDITMEM_STORE`` when given), loads the default
model, and asks questions (in scope, rephrased, unrelated) through the memory-augmented model before and after adding
a handful of edits written for the demo, showing which edit (id, version) shaped each answer. It then corrects, rolls
back and retracts edits and shows the answer follow each change, and prints an edit's history. Scope is the
classifier named ``default``: one trained with ``editmem train-scope``, else the head shipped in the package
(scope/default_head); ``--scope cosine`` uses the untrained cosine threshold instead. A chat model is asked
questions through its chat template, with an in-scope edit as messages before the question
(editors.retrieval.augmented.CHAT_CONTEXTS); cloze prompts ("The capital of Australia is") are continued as plain
text, an in-scope edit's fact before them in a format with nothing to repeat
(editors.retrieval.augmented.CLEAN_GENERATE_CONTEXT). Each answer line says what it was routed through and how it was
asked.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEMO_EDITS = (
    dict(prompt="The capital of Australia is", target_new="Melbourne", subject="Australia", ground_truth="Canberra",
         rephrases=("Australia's seat of government is in",)),
    dict(prompt="The CEO of Acme Robotics is", target_new="Dana Okafor", subject="Acme Robotics",
         rephrases=("Acme Robotics is run by",)),
    dict(prompt="Marie Curie was born in the city of", target_new="Lyon", subject="Marie Curie",
         ground_truth="Warsaw"),
    dict(prompt="The official language of Brazil is", target_new="Spanish", subject="Brazil",
         ground_truth="Portuguese"),
    dict(prompt="The Eiffel Tower is located in", target_new="Rome", subject="Eiffel Tower", ground_truth="Paris"),
)

DEMO_QUESTIONS = (
    ("edit", "The capital of Australia is"),
    ("rephrased", "Which city is the capital of Australia?"),
    ("edit", "The official language of Brazil is"),
    ("rephrased", "Who leads Acme Robotics as chief executive?"),
    ("unrelated", "The capital of France is"),
    ("unrelated", "The tallest mountain on Earth is"),
)
FOLLOW_QUESTIONS = (
    ("edit", "The capital of Australia is"),
    ("rephrased", "Which city is the capital of Australia?"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="add edits, ask the model before and after, update, roll back (the main job)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("--scope", default="default", help="scope classifier name or 'cosine' (default: %(default)s, the "
                                                      "trained head shipped with editmem unless you trained one)")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the scope's threshold (for --scope cosine: default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=run_demo)


def _line(text: str = "") -> None:
    print(text, flush=True)


def _short(text: str) -> str:
    from eval.answers import first_answer

    return first_answer(text) or "(nothing)"


def _as_chat(wrapper, question: str) -> bool:
    """A chat model gets questions through its chat template; a cloze prompt ("The capital of Australia is") is
    continued as plain text, as a completion model would be asked it."""
    from editors.lm.chat import is_question

    return wrapper.chat is not None and is_question(question)


def _describe(wrapper, answer) -> str:
    d = answer.decision
    how = "chat" if _as_chat(wrapper, answer.question) else "completion"
    if d.edit is None:
        return f"{_short(answer.text)!r}  [base model: no edit in scope] (asked as {how})"
    return f"{_short(answer.text)!r}  [edit #{d.edit.id} v{d.edit.version}, score {d.score:.2f}] (edit in context, " \
           f"asked as {how})"


def demo_answers(wrapper, questions, max_new_tokens: int) -> list:
    """The wrapper's answers to ``questions`` ((kind, question) pairs), asked in one batch."""
    texts = [q for _, q in questions]
    return wrapper.ask_many(texts, max_new_tokens=max_new_tokens, chat=[_as_chat(wrapper, q) for q in texts])


def _ask_all(wrapper, questions, max_new_tokens: int) -> list:
    answers = demo_answers(wrapper, questions, max_new_tokens)
    for (kind, question), answer in zip(questions, answers):
        _line(f"   [{kind:9}] {question:48} -> {_describe(wrapper, answer)}")
    return answers


def walk(wrapper, mem, max_new_tokens: int) -> dict[str, list]:
    """Steps 1-7 of the demo on ``wrapper`` over the (empty) store ``mem``, printed; returns each step's answers
    (keys ``before``, ``after``, ``corrected``, ``rolled back``, ``retracted``) for the demo's own test."""
    steps: dict[str, list] = {}
    _line("== 1. before any edit: the base model answers")
    steps["before"] = _ask_all(wrapper, DEMO_QUESTIONS, max_new_tokens)
    _line()
    _line("== 2. add edits")
    records = mem.add_many(DEMO_EDITS)
    for r in records:
        _line(f"   #{r.id} v{r.version}: {r.prompt} -> {r.target_new}")
    _line()
    _line("== 3. ask again: the edit prompts, rephrasings, and unrelated questions")
    steps["after"] = _ask_all(wrapper, DEMO_QUESTIONS, max_new_tokens)
    _line()
    capital, tower = records[0], records[4]
    _line(f"== 4. correct edit #{capital.id}: the capital is now Perth")
    updated = mem.update(capital.id, target_new="Perth")
    _line(f"   #{updated.id} is now at v{updated.version}")
    steps["corrected"] = _ask_all(wrapper, FOLLOW_QUESTIONS, max_new_tokens)
    _line()
    _line(f"== 5. roll edit #{capital.id} back to v1")
    rolled = mem.rollback(capital.id, 1)
    _line(f"   #{rolled.id} is now at v{rolled.version} (a new version equal to v1; nothing overwritten)")
    steps["rolled back"] = _ask_all(wrapper, FOLLOW_QUESTIONS, max_new_tokens)
    _line()
    _line(f"== 6. retract edit #{tower.id} (Eiffel Tower): the base model answers again")
    mem.delete(tower.id)
    steps["retracted"] = _ask_all(wrapper, (("edit", tower.prompt),), max_new_tokens)
    _line()
    _line(f"== 7. history of edit #{capital.id}")
    for v in mem.history(capital.id):
        state = "deleted" if v.deleted else ("current" if v.valid_to is None else "closed")
        _line(f"   v{v.version} [{state:7}] {v.prompt} -> {v.target_new}")
    _line()
    return steps


def open_demo(model_name: str, scope_name: str, threshold: float | None, url: str):
    """The demo's model, store and wrapper: ``(wrapper, mem)`` (the caller closes ``mem``)."""
    from editors.lm.loading import load_model
    from editors.retrieval.augmented import AugmentedModel
    from editors.retrieval.setup import (
        DEFAULT_COUNTERFACTUAL,
        counterfactual_options,
        load_classifier,
        load_rerankers,
    )
    from memory import EditMemory
    from scope.rerank import DEFAULT_RERANKER

    model, tokenizer = load_model(model_name)
    mem = EditMemory.open(url)
    threshold = 0.5 if scope_name == "cosine" and threshold is None else threshold
    scope = load_classifier(scope_name, threshold=threshold, encoder=mem.encoder.name)
    # as SERAC by default: the shipped relation reranker behind the shipped head (none behind any other scope)
    reranker, _ = load_rerankers(DEFAULT_RERANKER, None, classifier=scope, keep_threshold=threshold is not None)
    options = counterfactual_options(DEFAULT_COUNTERFACTUAL, model, tokenizer)
    return AugmentedModel(model, tokenizer, mem, scope, reranker=reranker, **options), mem


def run_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="editmem-demo-") as tmp:
        url = args.store if args.store_given else f"sqlite:///{Path(tmp) / 'demo.db'}"
        _line(f"== editmem demo: store at {url}")
        wrapper, mem = open_demo(args.model, args.scope, args.threshold, url)
        with mem:
            scope = wrapper.scope
            _line(f"   model: {args.model} ({type(wrapper.model).__name__}), loaded in "
                  f"{time.perf_counter() - started:.1f} s")
            source = scope.info.get("name", args.scope)
            how = "questions through the chat template, cloze prompts as completions" if wrapper.chat is not None \
                else "plain completion"
            behind = " behind the shipped relation reranker" if wrapper.router.reranker is not None else ""
            _line(f"   encoder: {mem.encoder.name}; scope: {scope.kind} {source!r} (threshold {scope.threshold:.3f}"
                  f"{behind}); {len(mem)} edits stored; asked as {how}")
            _line()
            walk(wrapper, mem, args.max_new_tokens)
            _line(f"== done in {time.perf_counter() - started:.1f} s; {len(mem)} current edits")
    return 0

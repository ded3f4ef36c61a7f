"""`editmem demo`: the main job, a short walk through the store that a new user can watch.

It creates a store in a temporary folder (or uses ``--store`` / ``EDITMEM_STORE`` when given), loads the default
model, and asks questions (in scope, rephrased, unrelated) through the memory-augmented model before and after adding
a handful of edits written for the demo, showing which edit (id, version) shaped each answer. It then corrects, rolls
back and retracts edits and shows the answer follow each change, and prints an edit's history. Scope is the
classifier named ``default``: one trained with ``editmem train-scope``, else the head shipped in the package
(scope/default_head); ``--scope cosine`` uses the untrained cosine threshold instead. A chat model is asked through its
chat template, with an in-scope edit as messages before the question (editors.retrieval.augmented.CHAT_CONTEXTS).
Each answer line says what it was routed through.
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="add edits, ask the model before and after, update, roll back (the main job)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("--scope", default="default", help="scope classifier name or 'cosine' (default: %(default)s, the "
                                                      "trained head shipped with editmem unless you trained one)")
    p.add_argument("--threshold", type=float, default=None,
                   help="override the scope's threshold (for --scope cosine: default 0.5)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=run_demo)


def _line(text: str = "") -> None:
    print(text, flush=True)


def _short(text: str) -> str:
    from eval.answers import first_answer

    return first_answer(text) or "(nothing)"


def _ask(wrapper, question: str, max_new_tokens: int) -> str:
    answer = wrapper.ask(question, max_new_tokens=max_new_tokens)
    d = answer.decision
    how = "chat" if wrapper.chat is not None else "completion"
    if d.edit is None:
        return f"{_short(answer.text)!r}  [base model: no edit in scope] (asked as {how})"
    return f"{_short(answer.text)!r}  [edit #{d.edit.id} v{d.edit.version}, score {d.score:.2f}] (edit in context, " \
           f"asked as {how})"


def _ask_all(wrapper, questions, max_new_tokens: int) -> None:
    for kind, question in questions:
        _line(f"   [{kind:9}] {question:48} -> {_ask(wrapper, question, max_new_tokens)}")


def run_demo(args: argparse.Namespace) -> int:
    from editors.lm.loading import load_model
    from editors.retrieval.augmented import AugmentedModel
    from editors.retrieval.setup import load_classifier
    from memory import EditMemory

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="editmem-demo-") as tmp:
        url = args.store if args.store_given else f"sqlite:///{Path(tmp) / 'demo.db'}"
        _line(f"== editmem demo: store at {url}")
        model, tokenizer = load_model(args.model)
        _line(f"   model: {args.model} ({type(model).__name__}), loaded in {time.perf_counter() - started:.1f} s")
        with EditMemory.open(url) as mem:
            threshold = 0.5 if args.scope == "cosine" and args.threshold is None else args.threshold
            scope = load_classifier(args.scope, threshold=threshold, encoder=mem.encoder.name)
            wrapper = AugmentedModel(model, tokenizer, mem, scope)
            source = scope.info.get("name", args.scope)
            _line(f"   encoder: {mem.encoder.name}; scope: {scope.kind} {source!r} (threshold {scope.threshold:.3f}); "
                  f"{len(mem)} edits stored; asked as {'chat' if wrapper.chat is not None else 'plain completion'}")
            _line()
            _line("== 1. before any edit: the base model answers")
            _ask_all(wrapper, DEMO_QUESTIONS, args.max_new_tokens)
            _line()
            _line("== 2. add edits")
            records = mem.add_many(DEMO_EDITS)
            for r in records:
                _line(f"   #{r.id} v{r.version}: {r.prompt} -> {r.target_new}")
            _line()
            _line("== 3. ask again: the edit prompts, rephrasings, and unrelated questions")
            _ask_all(wrapper, DEMO_QUESTIONS, args.max_new_tokens)
            _line()
            capital = records[0]
            follow = (("rephrased", "Which city is the capital of Australia?"),)
            _line(f"== 4. correct edit #{capital.id}: the capital is now Perth")
            updated = mem.update(capital.id, target_new="Perth")
            _line(f"   #{updated.id} is now at v{updated.version}")
            _ask_all(wrapper, follow, args.max_new_tokens)
            _line()
            _line(f"== 5. roll edit #{capital.id} back to v1")
            rolled = mem.rollback(capital.id, 1)
            _line(f"   #{rolled.id} is now at v{rolled.version} (a new version equal to v1; nothing overwritten)")
            _ask_all(wrapper, follow, args.max_new_tokens)
            _line()
            tower = records[4]
            _line(f"== 6. retract edit #{tower.id} (Eiffel Tower): the base model answers again")
            mem.delete(tower.id)
            _ask_all(wrapper, (("edit", tower.prompt),), args.max_new_tokens)
            _line()
            _line(f"== 7. history of edit #{capital.id}")
            for v in mem.history(capital.id):
                state = "deleted" if v.deleted else ("current" if v.valid_to is None else "closed")
                _line(f"   v{v.version} [{state:7}] {v.prompt} -> {v.target_new}")
            _line()
            _line(f"== done in {time.perf_counter() - started:.1f} s; {len(mem)} current edits")
    return 0

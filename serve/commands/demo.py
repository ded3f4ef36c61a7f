"""`editmem demo`: the main job, a short walk through the store that a new user can watch.

It creates a store in a temporary folder (or uses ``--store`` when given explicitly), adds a handful of edits written
for the demo, asks questions (in scope, rephrased, unrelated) and shows which edit the retrieval finds, then updates
and rolls back one edit and shows the answer follow, and prints the edit's history.
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
    ("in scope", "The capital of Australia is"),
    ("rephrased", "Which city is the capital of Australia?"),
    ("rephrased", "Who leads Acme Robotics as chief executive?"),
    ("rephrased", "What language do people speak in Brazil?"),
    ("unrelated", "The tallest mountain on Earth is"),
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="walk through the store: add edits, ask, update, roll back (the main job)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="cosine similarity at or above which a question counts as inside an edit (default 0.5; "
                        "the trained scope classifier replaces this)")
    p.set_defaults(func=run_demo)


def _line(text: str = "") -> None:
    print(text, flush=True)


def _ask(mem, question: str, threshold: float) -> str:
    hits = mem.search(question, k=1)
    if not hits or hits[0].score < threshold:
        best = f" (closest edit scores {hits[0].score:.2f})" if hits else ""
        return f"no stored edit applies{best} -> the base model would answer"
    hit = hits[0]
    e = hit.edit
    return f"edit #{e.id} v{e.version} (score {hit.score:.2f}): {e.prompt} -> {e.target_new}"


def run_demo(args: argparse.Namespace) -> int:
    from memory import EditMemory

    started = time.perf_counter()
    explicit = args.store_given
    with tempfile.TemporaryDirectory(prefix="editmem-demo-") as tmp:
        url = args.store if explicit else f"sqlite:///{Path(tmp) / 'demo.db'}"
        _line(f"== editmem demo: store at {url}")
        with EditMemory.open(url) as mem:
            _line(f"   encoder: {mem.encoder.name}; {len(mem)} edits stored")
            _line()
            _line("== 1. add edits")
            records = mem.add_many(DEMO_EDITS)
            for r in records:
                _line(f"   #{r.id} v{r.version}: {r.prompt} -> {r.target_new}")
            _line()
            _line("== 2. ask: which stored edit, if any, covers each question")
            for kind, question in DEMO_QUESTIONS:
                _line(f"   [{kind:9}] {question}")
                _line(f"               {_ask(mem, question, args.threshold)}")
            _line()
            capital = records[0]
            question = "Which city is the capital of Australia?"
            _line(f"== 3. correct edit #{capital.id}: the capital is now Sydney")
            updated = mem.update(capital.id, target_new="Sydney")
            _line(f"   #{updated.id} is now at v{updated.version}")
            _line(f"   {question}\n               {_ask(mem, question, args.threshold)}")
            _line()
            _line(f"== 4. roll edit #{capital.id} back to v1")
            rolled = mem.rollback(capital.id, 1)
            _line(f"   #{rolled.id} is now at v{rolled.version} (a new version equal to v1; nothing overwritten)")
            _line(f"   {question}\n               {_ask(mem, question, args.threshold)}")
            _line()
            _line(f"== 5. retract edit #{records[4].id} (Eiffel Tower)")
            mem.delete(records[4].id)
            q = "Where is the Eiffel Tower?"
            _line(f"   {q}\n               {_ask(mem, q, args.threshold)}")
            _line()
            _line(f"== 6. history of edit #{capital.id}")
            for v in mem.history(capital.id):
                state = "deleted" if v.deleted else ("current" if v.valid_to is None else "closed")
                _line(f"   v{v.version} [{state:7}] {v.prompt} -> {v.target_new}")
            _line()
            _line(f"== done in {time.perf_counter() - started:.1f} s; {len(mem)} current edits")
    return 0

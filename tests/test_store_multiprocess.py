"""Two processes on one store (SQLite file or PostgreSQL) see each other's writes without reopening."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.test_store_fixtures import ENCODER, FACTS, open_store

pytestmark = pytest.mark.usefixtures("editmem_cache")  # PostgreSQL index files go to tmp_path

REPO = Path(__file__).resolve().parent.parent

# A child process that keeps one EditMemory open and answers JSON commands, one per line.
CHILD = textwrap.dedent("""
    import json, sys
    from memory import EditMemory
    mem = EditMemory.open(sys.argv[1], encoder=sys.argv[2])
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "add":
            out = mem.add(cmd["prompt"], cmd["target"]).id
        elif op == "update":
            out = mem.update(cmd["id"], target_new=cmd["target"]).version
        elif op == "delete":
            out = mem.delete(cmd["id"]).version
        elif op == "len":
            out = len(mem)
        elif op == "search":
            out = [[h.edit.id, h.edit.target_new] for h in mem.search(cmd["text"], k=cmd.get("k", 3))]
        elif op == "verify":
            mem.verify()
            out = True
        print(json.dumps(out), flush=True)
    mem.close()
""")


class Child:
    def __init__(self, url: str, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, url, ENCODER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)

    def __call__(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"child process died (exit {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_two_processes_see_each_others_writes(store_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open_store(store_url) as mem:
        mem.add_many(FACTS[:2])
        child = Child(store_url, env)
        try:
            assert child(op="len") == 2
            # the child writes; this process sees it without reopening
            new_id = child(op="add", prompt="The CEO of Acme Robotics is", target="Dana Okafor")
            assert len(mem) == 3
            assert mem.search("CEO of Acme Robotics", k=1)[0].edit.id == new_id
            child(op="update", id=1, target="Nice")
            child(op="delete", id=2)
            hits = mem.search("The capital of France is", k=5)
            assert {h.edit.id for h in hits} == {1, new_id}
            assert next(h for h in hits if h.edit.id == 1).edit.target_new == "Nice"
            mem.verify()
            # and the reverse: this process writes, the long-running child sees it
            mine = mem.add("The longest river in Africa is", "Amazon")
            mem.update(new_id, target_new="Sam Lee")
            mem.delete(1)
            assert child(op="len") == 2
            assert child(op="search", text="longest river in Africa", k=1) == [[mine.id, "Amazon"]]
            assert sorted(child(op="search", text="Acme Robotics CEO", k=5)) == [[new_id, "Sam Lee"],
                                                                                [mine.id, "Amazon"]]
            assert child(op="verify") is True
        finally:
            child.close()
        mem.verify()
        assert len(mem) == 2


WRITER = textwrap.dedent("""
    import sys
    from memory import EditMemory
    with EditMemory.open(sys.argv[1], encoder=sys.argv[2]) as mem:
        for i in range(25):
            rec = mem.add(f"writer {sys.argv[3]} fact {i} is", f"value {i}")
            if i % 3 == 0:
                mem.update(rec.id, target_new=f"changed {i}")
            if i % 5 == 0:
                mem.delete(rec.id)
            mem.search(f"fact {i}", k=2)
""")


def test_concurrent_writers_keep_sql_and_index_in_step(store_url: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open_store(store_url) as mem:
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, store_url, ENCODER, name], cwd=REPO, env=env)
                 for name in ("a", "b")]
        for i in range(25):  # this process writes at the same time
            mem.add(f"parent fact {i} is", f"value {i}")
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert len(mem) == 25 + 2 * 20
        ids = [r.id for r in mem.list(include_deleted=True)]
        assert len(ids) == len(set(ids)) == 75
        mem.verify()
        hits = mem.search("writer a fact 7 is", k=1)
        assert hits[0].edit.prompt == "writer a fact 7 is" and hits[0].edit.version == 1

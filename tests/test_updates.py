"""eval.updates: the update / rollback rates under the generate protocol, on a stand-in editor whose answers are
whatever its store currently holds (so the rates must be 1 and 0 where the store is followed), and one that never
changes its answer after the first (so the update rate must be 0)."""

from __future__ import annotations

from types import SimpleNamespace

from editors.retrieval.setup import MemoryEditHandle
from eval.updates import measure_updates, other_target
from memory.records import EditCase
from memory.store import EditMemory

CASES = [EditCase("The capital of France is", "Rome", subject="France", ground_truth="Paris",
                  rephrases=("France's capital city is",)),
         EditCase("The capital of Spain is", "Paris", subject="Spain", ground_truth="Madrid",
                  rephrases=("Spain's capital city is",)),
         EditCase("The capital of Italy is", "Lyon", subject="Italy", ground_truth="Rome")]


class _Editor:
    def __init__(self, frozen: bool = False):
        self.memory = EditMemory.open("sqlite://", encoder="hashing-256")
        self.frozen, self.first = frozen, None
        self.model = SimpleNamespace(ask_many=self._ask_many)

    def apply(self, requests):
        records = self.memory.add_many([{"prompt": r.prompt, "target_new": r.target_new} for r in requests])
        self.first = None
        return MemoryEditHandle(self.memory, [(r.id, r.version) for r in records])

    def _ask_many(self, prompts, max_new_tokens):
        current = self.memory.list()[-1].target_new
        if self.frozen:
            self.first = self.first or current
            current = self.first
        return [SimpleNamespace(text=f"It is {current}. (more)") for _ in prompts]


def test_other_target_differs_from_the_case_own_targets():
    assert other_target(CASES, 0) == "Lyon"  # "Paris" is case 0's ground truth
    assert other_target(CASES, 1) == "Lyon"
    assert other_target(CASES, 2) == "Paris"  # "Rome" is case 2's ground truth
    assert other_target(CASES[:1], 0) is None


def test_a_store_following_editor_scores_one_and_a_frozen_one_zero():
    result = measure_updates(_Editor(), CASES)["summary"]
    assert result["n_cases"] == 3 and result["leaks"] == 0
    for key in ("edit_prompt", "edit_rephrase", "update_prompt", "update_rephrase", "rollback_prompt",
                "rollback_rephrase"):
        assert result[key] == 1.0, key
    assert result["update_old_prompt"] == 0.0 and result["rollback_stale_prompt"] == 0.0
    frozen = measure_updates(_Editor(frozen=True), CASES)["summary"]
    assert frozen["update_prompt"] == 0.0 and frozen["update_old_prompt"] == 1.0 and frozen["rollback_prompt"] == 1.0

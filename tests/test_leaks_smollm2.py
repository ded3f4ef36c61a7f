"""No context-format string leaks into SmolLM2's answers: a handful of real CounterFact edits, asked through the
wrapper (chat template, the shipped scope head) and through the demo's own edits."""

from __future__ import annotations

import pytest

from editors.retrieval.augmented import AugmentedModel
from editors.retrieval.setup import load_classifier
from eval.answers import find_leaks, first_answer
from eval.datasets import load_cases
from memory import EditMemory
from tests.tiny import smollm2


@pytest.mark.integration
def test_answers_to_real_edits_hold_no_format_strings(data_dir):
    cases = load_cases(data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json", limit=4)
    model, tok = smollm2()
    with EditMemory.open("sqlite://") as mem:
        mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject} for c in cases])
        wrapper = AugmentedModel(model, tok, mem, load_classifier("default", encoder=mem.encoder.name))
        assert wrapper.chat is not None
        answers, routed = [], 0
        for c in cases:
            for question in (c.prompt, *c.rephrases[:1]):
                a = wrapper.ask(question, max_new_tokens=24)
                routed += a.edit is not None
                answers.append(first_answer(a.text))
        assert routed >= len(answers) // 2  # the edits were in context for most of them
        assert find_leaks(answers) == [], answers


@pytest.mark.integration
def test_plain_completions_of_real_edits_hold_no_format_strings(data_dir):
    """Cloze prompts continued as plain text (chat=False): the wrapper's default `answer` context, whose "(answer: X)"
    SmolLM2 repeats, is replaced for generation by the clean format (CLEAN_GENERATE_CONTEXT)."""
    cases = load_cases(data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json", limit=6)
    model, tok = smollm2()
    with EditMemory.open("sqlite://") as mem:
        mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject} for c in cases])
        wrapper = AugmentedModel(model, tok, mem, load_classifier("default", encoder=mem.encoder.name))
        questions = [q for c in cases for q in (c.prompt, *c.rephrases[:1])]
        asked = wrapper.ask_many(questions, max_new_tokens=24, chat=False)
        assert sum(a.edit is not None for a in asked) >= len(asked) // 2
        answers = [first_answer(a.text) for a in asked]
        assert find_leaks(answers) == [], answers


@pytest.mark.integration
def test_question_edits_are_answered_not_echoed(data_dir):
    """zsRE's edits are questions: the answer names the target in its first sentence instead of repeating the
    question first (what the example exchange taught when its reply was the question plus the target)."""
    cases = load_cases(data_dir / "zsre" / "zsre_mend_eval_portability_gpt4.json", limit=3)
    model, tok = smollm2()
    with EditMemory.open("sqlite://") as mem:
        mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject} for c in cases])
        wrapper = AugmentedModel(model, tok, mem, load_classifier("default", encoder=mem.encoder.name))
        for c in cases:
            a = wrapper.ask(c.prompt, max_new_tokens=24)
            assert a.edit is not None and a.edit.target_new == c.target_new
            first = first_answer(a.text)
            assert c.target_new.lower() in first.lower(), (c.prompt, a.text)
            assert not first.rstrip().endswith("?"), a.text

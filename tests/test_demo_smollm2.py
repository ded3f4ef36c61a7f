"""The demo's answers to its own edits on the real default model (SmolLM2-135M-Instruct, the shipped scope head):
each edit prompt and rephrasing is answered with the new target, the correction and the rollback are followed at
once, a retracted edit gives the base model's answer back, unrelated questions keep the base model's answers, and
no answer holds a format string."""

from __future__ import annotations

import pytest

from eval.answers import answer_matches, find_leaks, first_answer
from serve.commands.demo import DEMO_QUESTIONS, open_demo, walk


@pytest.mark.integration
def test_demo_answers_follow_its_edits_corrections_and_rollback(capsys):
    wrapper, mem = open_demo("smollm2-135m", "default", None, "sqlite://")
    with mem:
        steps = walk(wrapper, mem, 20)
    capsys.readouterr()
    texts = {step: [first_answer(a.text) for a in answers] for step, answers in steps.items()}
    after = dict(zip((q for _, q in DEMO_QUESTIONS), steps["after"]))
    expected = {"The capital of Australia is": "Melbourne", "Which city is the capital of Australia?": "Melbourne",
                "The official language of Brazil is": "Spanish",
                "Who leads Acme Robotics as chief executive?": "Dana Okafor"}
    for question, target in expected.items():
        answer = after[question]
        assert answer.edit is not None, question
        assert answer_matches(answer.text, [target]), (question, answer.text)
    for (kind, _question), before, now in zip(DEMO_QUESTIONS, steps["before"], steps["after"]):
        if kind == "unrelated":
            assert now.edit is None and now.text == before.text
    for step, target, old in (("corrected", "Perth", "Melbourne"), ("rolled back", "Melbourne", "Perth")):
        for answer in steps[step]:
            assert answer.edit is not None and answer_matches(answer.text, [target]), (step, answer.text)
            assert not answer_matches(answer.text, [old]), (step, answer.text)
    retracted = steps["retracted"][0]
    assert retracted.edit is None and not answer_matches(retracted.text, ["Rome"]), retracted.text
    assert find_leaks([t for answers in texts.values() for t in answers]) == [], texts

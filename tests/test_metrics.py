"""Metrics on models whose predictions are known by construction, and hand-computed n-gram entropies."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from editors.lm.tokens import encode_prompt_target
from eval.metrics import (
    GENERATE,
    PROTOCOLS,
    TEACHER_FORCED,
    MetricSettings,
    aggregate,
    answer_predictions,
    generation_matches,
    greedy_generate,
    greedy_generate_ids,
    measure_case,
    n_gram_entropy,
    normalize_answer,
    text_ngram_entropy,
    token_accuracy,
    unchanged_share,
)
from memory.errors import ValidationError
from memory.records import EditCase, Probe
from tests.tiny import tiny_model, tiny_tokenizer


class BigramLM(torch.nn.Module):
    """A fake causal LM whose prediction after a token depends on that token only: ``next_of[token]``.

    ``generate`` is greedy on the same table and, like Hugging Face, returns the inputs followed by the new tokens.
    """

    def __init__(self, vocab: int, default: int):
        super().__init__()
        self.vocab = vocab
        self.register_buffer("next_of", torch.full((vocab,), default, dtype=torch.long))
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def set(self, token: int, nxt: int) -> BigramLM:
        self.next_of[token] = nxt
        return self

    def forward(self, input_ids, attention_mask=None):
        logits = torch.nn.functional.one_hot(self.next_of[input_ids], self.vocab).float() * 10.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=1, **_):
        ids = input_ids
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, self.next_of[ids[:, -1:]]], dim=1)
        return ids


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, prompt, answer):
    ids, start = encode_prompt_target(tok, prompt, answer)
    return ids[:start], ids[start:]


def _teach(model, tok, prompt, answer, correct: int | None = None):
    """Make ``model`` predict the first ``correct`` answer tokens (all if None) after ``prompt``, teacher-forced."""
    p, a = _ids(tok, prompt, answer)
    chain = [p[-1], *a]
    n = len(a) if correct is None else correct
    for i in range(n):
        model.set(chain[i], chain[i + 1])
    return a


PROMPT = "The capital of France is"
ANSWER = "Tokyo Paris"  # two tokens in the tiny vocabulary (checked below)


def test_two_token_answer(tok):
    assert len(_ids(tok, PROMPT, ANSWER)[1]) == 2


@pytest.mark.parametrize("correct, expected", [(0, 0.0), (1, 0.5), (2, 1.0)])
def test_teacher_forced_accuracy(tok, correct, expected):
    model = BigramLM(len(tok), default=tok.pad_token_id)
    _teach(model, tok, PROMPT, ANSWER, correct)
    [(pred, ans)] = answer_predictions(model, tok, [PROMPT], [ANSWER])
    assert token_accuracy(pred, ans) == expected
    case = EditCase(prompt=PROMPT, target_new=ANSWER)
    assert measure_case(model, tok, case, [TEACHER_FORCED]).values[TEACHER_FORCED]["reliability"] == expected


def test_token_accuracy_and_unchanged_share_units():
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert unchanged_share([5, 6, 7], [5, 6, 7]) == 1.0
    assert unchanged_share([5, 6, 7], [5, 0, 7]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        token_accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        unchanged_share([], [])


def test_locality_identical_is_one_and_one_changed_token_counts(tok):
    loc = Probe("People in Germany speak", "Tokyo Paris")
    case = EditCase(prompt=PROMPT, target_new="Rome", locality=(loc,))
    model = BigramLM(len(tok), default=tok.pad_token_id)
    answer = _teach(model, tok, loc.prompt, loc.answer)
    pre = measure_case(model, tok, case, PROTOCOLS)
    assert pre.values[TEACHER_FORCED]["locality"] == 1.0
    same = measure_case(model, tok, case, PROTOCOLS, reference=pre.reference)
    assert same.values[TEACHER_FORCED]["locality"] == 1.0
    assert same.values[GENERATE]["locality"] == 1.0
    # Change the prediction at the second answer position only: one of two tokens differs.
    model.set(answer[0], tok.eos_token_id)
    post = measure_case(model, tok, case, PROTOCOLS, reference=pre.reference)
    assert post.values[TEACHER_FORCED]["locality"] == 0.5
    assert post.values[GENERATE]["locality"] == 0.0  # the generation changed


def test_case_without_probes_gives_none_and_aggregate_skips_it(tok):
    model = BigramLM(len(tok), default=tok.pad_token_id)
    case = EditCase(prompt=PROMPT, target_new=ANSWER, rephrases=(PROMPT,))
    values = measure_case(model, tok, case, [TEACHER_FORCED]).values[TEACHER_FORCED]
    assert values["locality"] is None and values["portability"] is None
    assert values["generalization"] == 0.0
    assert aggregate([{"reliability": 1.0, "locality": None}, {"reliability": 0.0, "locality": 0.5}]) == {
        "reliability": 0.5, "generalization": None, "locality": 0.5, "portability": None, "fluency": None}


def test_generate_protocol_matches_and_portability(tok):
    model = BigramLM(len(tok), default=tok.eos_token_id)
    _teach(model, tok, PROMPT, ANSWER)
    port = Probe("The Colosseum is in", "Rome", aliases=("Tokyo",))
    _teach(model, tok, port.prompt, "Tokyo")
    case = EditCase(prompt=PROMPT, target_new=ANSWER, portability=(port,))
    values = measure_case(model, tok, case, [GENERATE]).values[GENERATE]
    assert values["reliability"] == 1.0
    assert values["portability"] == 1.0  # matched through the alias
    assert values["fluency"] is not None and values["fluency"] >= 0.0


def test_fluency_skipped_when_zero_tokens(tok):
    model = BigramLM(len(tok), default=tok.eos_token_id)
    case = EditCase(prompt=PROMPT, target_new=ANSWER)
    values = measure_case(model, tok, case, PROTOCOLS, settings=MetricSettings(fluency_tokens=0)).values
    assert values[TEACHER_FORCED]["fluency"] is None and values[GENERATE]["fluency"] is None


def test_unknown_protocol_is_refused(tok):
    with pytest.raises(ValidationError):
        measure_case(BigramLM(len(tok), 0), tok, EditCase(prompt=PROMPT, target_new="x"), ["beam"])
    with pytest.raises(ValidationError):
        MetricSettings(slack_tokens=-1)


def test_greedy_generate_budgets_and_eos(tok):
    model = BigramLM(len(tok), default=tok.eos_token_id)
    answer = _teach(model, tok, PROMPT, ANSWER)
    other = "People in Germany speak"
    ids = greedy_generate_ids(model, tok, [PROMPT, other, PROMPT], [5, 3, 1])
    assert ids[0] == answer  # stops at eos after the two taught tokens
    assert ids[1] == []  # eos straight away
    assert ids[2] == answer[:1]  # cut to its own budget
    assert greedy_generate(model, tok, [PROMPT], 5)[0].strip() == ANSWER


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # four distinct words: 3 distinct bigrams, 2 distinct trigrams.
    assert text_ngram_entropy("x y z w") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    assert text_ngram_entropy("the the the the the") == 0.0
    assert text_ngram_entropy("one") == 0.0
    # punctuation is a token of its own
    assert text_ngram_entropy("a, b") == pytest.approx(text_ngram_entropy("a c b"))
    assert n_gram_entropy(["a b a b", "the the the"]) == pytest.approx(text_ngram_entropy("a b a b") / 2)


def test_normalisation_and_match():
    assert normalize_answer("  The Paris, France. ") == "paris france"
    assert normalize_answer("An apple a day") == "apple day"
    assert generation_matches(" Paris, the capital of France", ["paris"])
    assert generation_matches("the Paris", ["Paris"])
    assert not generation_matches(" Parisian food", ["Paris"])
    assert not generation_matches(" Rome", ["Paris"])
    assert generation_matches(" NYC is big", ["New York", "NYC"])
    assert not generation_matches(" anything", ["The"])  # an answer that normalises to nothing never matches


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_equals_one_by_one_on_a_real_tiny_model(arch):
    model, tok = tiny_model(arch)
    prompts = ["The capital of France is", "Hi", "People in Germany speak the official language of"]
    answers = ["Paris", "Tokyo Berlin Rome", "German"]
    assert answer_predictions(model, tok, prompts, answers) == [
        answer_predictions(model, tok, [p], [a])[0] for p, a in zip(prompts, answers)]
    assert greedy_generate_ids(model, tok, prompts, 6) == [greedy_generate_ids(model, tok, [p], 6)[0]
                                                          for p in prompts]

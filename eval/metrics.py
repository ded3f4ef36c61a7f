"""Editing metrics as EasyEdit defines them, plus a generation protocol and fluency.

Definitions follow EasyEdit (Wang et al. 2024, "EasyEdit: An Easy-to-use Knowledge Editing Framework for Large
Language Models"; zjunlp/EasyEdit evaluate utils) and ROME (Meng et al. 2022) for fluency. The code is our own.

Two protocols; every number carries the name of the one that produced it:

``teacher-forced``
    Feed prompt + answer in one forward pass. At each answer position, the prediction is the argmax of the previous
    position's logits. *Token accuracy* of a probe is the share of answer tokens predicted exactly; it scores
    reliability (prompt -> target_new), generalization (each rephrase -> target_new) and portability (each portability
    probe -> its answer). *Locality* of a probe is the share of its answer positions whose predicted token is the same
    after the edit as before it (the answer is the probe's own answer, teacher-forced both times); the unedited model
    scores exactly 1.0.

``generate``
    The answer a user reads (:mod:`eval.answers`). Each probe is put to the model as a user would: the prompt as the
    user's message through the tokenizer's chat template when it has one (``chat="auto"``; ``"never"``: plain
    completion always), else as a plain completion; with ``cloze="complete"``, cloze prompts (not ending in '?') are
    continued as plain text even by a chat model. Greedy decoding, stopped at end of turn (eos) or after
    ``answer_tokens`` new tokens (at least the answer's length + ``slack_tokens``), then cut at the first line break
    and the end of the first sentence. A probe scores 1 if its normalised target (or an alias) occurs at word
    boundaries in that normalised first answer, else 0. Normalisation: lowercase, drop punctuation, drop the articles
    a/an/the, collapse whitespace. Locality of a probe is 1 if the normalised first answers before and after the edit
    are equal, else 0. The generated answers are kept in ``CaseScores.answers``; the harness counts the leaked
    format strings among them that the edit caused (:func:`eval.answers.edit_leaks`).

Fluency (either protocol) is ROME's weighted n-gram entropy, in **bits** (not a fraction): the edit prompt is
continued greedily for ``fluency_tokens`` (default 50) new tokens; the prompt plus continuation is split into word
tokens; for n = 2 and 3 the entropy (base 2) of the n-gram frequency distribution is taken; the two are weighted
2/3 and 4/3 and averaged (i.e. weights 1/3 and 2/3 normalised). ROME splits words with nltk; we use the regex
``\\w+|[^\\w\\s]``, which agrees with it on ordinary text.

Aggregation: a case's value for a metric is the mean over its probes (``None`` when it has none); a run's value is the
mean over the cases that have the metric (``None`` when no case has a probe for it).

All probes of one case are scored in one teacher-forced forward pass (right padding with an attention mask) and, for
the generation protocol, one ``generate`` call (left padding). The device is taken from the model.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from editors.lm.chat import chat_frame
from editors.lm.tokens import encode_batch, encode_prompt, pad_id
from eval.answers import CHAT_MODES, CLOZE_MODES, answer_matches, first_answer, probe_input
from memory.errors import ValidationError
from memory.records import EditCase

TEACHER_FORCED = "teacher-forced"
GENERATE = "generate"
PROTOCOLS: tuple[str, ...] = (TEACHER_FORCED, GENERATE)

# Metric names in report order. Fractions in [0, 1] except fluency (bits).
METRICS: tuple[str, ...] = ("reliability", "generalization", "locality", "portability", "fluency")
PROBE_GROUPS: tuple[str, ...] = ("reliability", "generalization", "portability", "locality")


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics are measured. ``fluency_tokens=0`` skips fluency (reported as ``None``)."""

    slack_tokens: int = 5
    fluency_tokens: int = 50
    max_rows_per_pass: int = 64
    answer_tokens: int = 24
    chat: str = "auto"
    cloze: str = "chat"

    def __post_init__(self) -> None:
        if self.answer_tokens < 1:
            raise ValidationError(f"answer_tokens must be >= 1 (got {self.answer_tokens})")
        if self.chat not in CHAT_MODES:
            raise ValidationError(f"chat must be one of {', '.join(CHAT_MODES)} (got {self.chat!r})")
        if self.cloze not in CLOZE_MODES:
            raise ValidationError(f"cloze must be one of {', '.join(CLOZE_MODES)} (got {self.cloze!r})")
        if self.slack_tokens < 0:
            raise ValidationError(f"slack_tokens must be >= 0 (got {self.slack_tokens})")
        if self.fluency_tokens < 0:
            raise ValidationError(f"fluency_tokens must be >= 0 (got {self.fluency_tokens})")
        if self.max_rows_per_pass < 1:
            raise ValidationError(f"max_rows_per_pass must be >= 1 (got {self.max_rows_per_pass})")


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless wrapper)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device(getattr(model, "device", "cpu"))


# ---------------------------------------------------------------------------------------------------------------------
# Teacher forcing


@torch.inference_mode()
def answer_predictions(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str],
                       *, max_rows_per_pass: int = 64) -> list[tuple[list[int], list[int]]]:
    """Teacher-forced predictions at the answer positions of each (prompt, answer) pair.

    Returns one ``(predicted_ids, answer_ids)`` per pair, both as long as the answer's tokens: ``predicted_ids[i]`` is
    the argmax of the logits at the position before answer token ``i``. All pairs go through the model in as few
    right-padded forward passes as ``max_rows_per_pass`` allows.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    device = model_device(model)
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(prompts), max_rows_per_pass):
        batch = encode_batch(tokenizer, prompts[start:start + max_rows_per_pass],
                             answers[start:start + max_rows_per_pass], padding_side="right")
        input_ids = batch.input_ids.to(device)
        attention_mask = batch.attention_mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # logits at position t predict token t + 1: shift so that preds[:, t] is the prediction for token t.
        preds = logits[:, :-1].argmax(dim=-1).cpu()
        target_mask = batch.target_mask[:, 1:]
        ids = batch.input_ids[:, 1:]
        for row in range(ids.shape[0]):
            m = target_mask[row]
            out.append((preds[row][m].tolist(), ids[row][m].tolist()))
    return out


def token_accuracy(predicted: Sequence[int], answer: Sequence[int]) -> float:
    """Share of answer tokens predicted exactly (EasyEdit's teacher-forced accuracy for one probe)."""
    if len(predicted) != len(answer):
        raise ValueError(f"{len(predicted)} predictions for {len(answer)} answer tokens")
    if not answer:
        raise ValueError("an answer with no tokens cannot be scored")
    return sum(int(p == a) for p, a in zip(predicted, answer)) / len(answer)


def unchanged_share(before: Sequence[int], after: Sequence[int]) -> float:
    """Share of positions whose predicted token is the same after the edit as before (EasyEdit's locality)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} predictions before the edit but {len(after)} after")
    if not before:
        raise ValueError("a locality probe with no answer tokens cannot be scored")
    return sum(int(b == a) for b, a in zip(before, after)) / len(before)


# ---------------------------------------------------------------------------------------------------------------------
# Generation


@torch.inference_mode()
def greedy_generate_ids(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                        *, max_rows_per_pass: int = 64) -> list[list[int]]:
    """Greedy continuations (new token ids only, cut at eos) of ``prompts``, in as few left-padded ``generate``
    calls as ``max_rows_per_pass`` allows.

    ``max_new_tokens`` may differ per prompt: each call decodes the largest budget of its rows and every row is cut to
    its own, which under greedy decoding equals decoding that row alone for that many tokens.
    """
    return generate_from_ids(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens,
                             max_rows_per_pass=max_rows_per_pass)


@torch.inference_mode()
def generate_from_ids(model: Any, tokenizer: Any, inputs: Sequence[Sequence[int]], max_new_tokens: Sequence[int] | int,
                      *, max_rows_per_pass: int = 64) -> list[list[int]]:
    """:func:`greedy_generate_ids` from token rows (e.g. chat-framed questions) instead of prompt texts."""
    budgets = [max_new_tokens] * len(inputs) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(inputs):
        raise ValueError(f"{len(inputs)} prompts but {len(budgets)} token budgets")
    device = model_device(model)
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    for start in range(0, len(inputs), max_rows_per_pass):
        encoded = [list(r) for r in inputs[start:start + max_rows_per_pass]]
        chunk_budgets = budgets[start:start + max_rows_per_pass]
        steps = max(chunk_budgets)
        if steps == 0:
            out.extend([] for _ in encoded)
            continue
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=steps, do_sample=False, pad_token_id=pad)
        new = generated[:, width:].cpu()
        for row, budget in enumerate(chunk_budgets):
            ids = new[row, :budget].tolist()
            if eos is not None and eos in ids:
                ids = ids[:ids.index(eos)]
            out.append(ids)
    return out


def greedy_generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                    *, max_rows_per_pass: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` as text (new text only); see :func:`greedy_generate_ids`."""
    ids = greedy_generate_ids(model, tokenizer, prompts, max_new_tokens, max_rows_per_pass=max_rows_per_pass)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_POSSESSIVE = re.compile(r"(?<=\w)['\u2019]s\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop possessive 's, punctuation and the articles a/an/the, collapse whitespace (SQuAD-style, with
    "Microsoft's" read as "microsoft" rather than "microsofts")."""
    text = _POSSESSIVE.sub("", text.lower()).translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def generation_matches(generated: str, answers: Iterable[str]) -> bool:
    """True if the normalised generation starts with a normalised answer, at a word boundary.

    "Paris, France" matches "Paris"; "Parisian" does not. An answer that normalises to nothing never matches.
    """
    gen = normalize_answer(generated)
    for answer in answers:
        norm = normalize_answer(answer)
        if norm and (gen == norm or gen.startswith(norm + " ")):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Fluency

_WORD = re.compile(r"\w+|[^\w\s]")


def _ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy`` for one text, in bits: mean over n of ``weight_n * H_n``.

    A text with fewer than n word tokens contributes 0 for that n (ROME would give NaN).
    """
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    tokens = _WORD.findall(text)
    return sum(w * _ngram_entropy_bits(tokens, n) for n, w in zip(ns, weights)) / len(ns)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Fluency as in ROME/EasyEdit: the weighted 2/3-gram entropy (bits), averaged over ``texts``."""
    if not texts:
        raise ValueError("n_gram_entropy needs at least one text")
    return sum(text_ngram_entropy(t) for t in texts) / len(texts)


# ---------------------------------------------------------------------------------------------------------------------
# One case: probes, the pre-edit reference, scores


@dataclass(frozen=True)
class ProbeRow:
    """One (prompt, answer) to score; ``group`` is the metric it counts towards."""

    group: str
    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()


def case_probes(case: EditCase) -> list[ProbeRow]:
    """Every probe of a case, reliability first (its prompt is the edit prompt, reused for fluency)."""
    rows = [ProbeRow("reliability", case.prompt, case.target_new)]
    rows += [ProbeRow("generalization", p, case.target_new) for p in case.rephrases]
    rows += [ProbeRow("portability", p.prompt, p.answer, p.aliases) for p in case.portability]
    rows += [ProbeRow("locality", p.prompt, p.answer, p.aliases) for p in case.locality]
    return rows


@dataclass(frozen=True)
class CaseReference:
    """What the model predicted before any edit, per locality probe: tokens (teacher-forced) and normalised text
    (generate). Locality after an edit is measured against it."""

    tokens: tuple[tuple[int, ...], ...] = ()
    texts: tuple[str, ...] | None = None


@dataclass
class CaseScores:
    """Per-protocol metric values of one case (``None`` where the case has no probe), and the reference made on the
    way (only meaningful for a pre-edit measurement)."""

    values: dict[str, dict[str, float | None]] = field(default_factory=dict)
    reference: CaseReference = field(default_factory=CaseReference)
    answers: tuple[str, ...] = ()  # generate: the first answer of every probe, in case_probes order
    # protocol -> the unchanged value of each locality probe, in case order (locality is their mean)
    locality_probes: dict[str, tuple[float, ...]] = field(default_factory=dict)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def measure_case(model: Any, tokenizer: Any, case: EditCase, protocols: Sequence[str], *,
                 reference: CaseReference | None = None, settings: MetricSettings = MetricSettings()) -> CaseScores:
    """Score every probe of ``case`` under each protocol in ``protocols``.

    Without ``reference`` this is the pre-edit measurement: locality is 1.0 by definition and the returned
    ``reference`` holds the predictions later measurements compare against. With it, locality compares to it.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValidationError(f"unknown protocol(s) {unknown}; choose from {list(PROTOCOLS)}")
    rows = case_probes(case)
    loc_rows = [r for r in rows if r.group == "locality"]
    if reference is not None and len(reference.tokens) != len(loc_rows):
        raise ValueError(f"the reference has {len(reference.tokens)} locality probes, the case {len(loc_rows)}")
    values: dict[str, dict[str, float | None]] = {}

    # Teacher forcing: always run, since locality's token reference is needed for later measurements.
    tf = answer_predictions(model, tokenizer, [r.prompt for r in rows], [r.answer for r in rows],
                            max_rows_per_pass=settings.max_rows_per_pass)
    per_group: dict[str, list[float]] = {g: [] for g in PROBE_GROUPS}
    loc_tokens: list[tuple[int, ...]] = []
    for row, (pred, ans) in zip(rows, tf):
        if row.group == "locality":
            before = reference.tokens[len(loc_tokens)] if reference is not None else tuple(pred)
            per_group["locality"].append(unchanged_share(before, pred))
            loc_tokens.append(tuple(pred))
        else:
            per_group[row.group].append(token_accuracy(pred, ans))
    locality_probes: dict[str, tuple[float, ...]] = {}
    if TEACHER_FORCED in protocols:
        values[TEACHER_FORCED] = {m: _mean(per_group[m]) for m in METRICS if m != "fluency"}
        locality_probes[TEACHER_FORCED] = tuple(per_group["locality"])

    # Generation: one call for every probe, each put to the model as a user would (eval.answers).
    fluency: float | None = None
    loc_texts: tuple[str, ...] | None = None
    answers: tuple[str, ...] = ()
    if GENERATE in protocols:
        frame = chat_frame(tokenizer) if settings.chat == "auto" else None
        inputs = [probe_input(tokenizer, r.prompt, frame, cloze=settings.cloze) for r in rows]
        budgets = [max(settings.answer_tokens, len(ans) + settings.slack_tokens) for _, ans in tf]
        gen_ids = generate_from_ids(model, tokenizer, inputs, budgets, max_rows_per_pass=settings.max_rows_per_pass)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in gen_ids]
        answers = tuple(first_answer(t) for t in texts)
        gen_groups: dict[str, list[float]] = {g: [] for g in PROBE_GROUPS}
        normalised_loc: list[str] = []
        for row, answer in zip(rows, answers):
            if row.group == "locality":
                norm = normalize_answer(answer)
                if reference is not None and reference.texts is not None:
                    before_text = reference.texts[len(normalised_loc)]
                else:
                    before_text = norm
                gen_groups["locality"].append(float(before_text == norm))
                normalised_loc.append(norm)
            else:
                gen_groups[row.group].append(float(answer_matches(answer, (row.answer, *row.aliases))))
        values[GENERATE] = {m: _mean(gen_groups[m]) for m in METRICS if m != "fluency"}
        locality_probes[GENERATE] = tuple(gen_groups["locality"])
        loc_texts = tuple(normalised_loc)
    if settings.fluency_tokens and values:
        # ROME's fluency: the edit prompt continued as plain text, whatever the protocol.
        text = greedy_generate(model, tokenizer, [rows[0].prompt], settings.fluency_tokens)[0]
        fluency = n_gram_entropy([rows[0].prompt + text])

    for protocol_values in values.values():
        protocol_values["fluency"] = fluency
    return CaseScores(values=values, reference=CaseReference(tokens=tuple(loc_tokens), texts=loc_texts),
                      answers=answers, locality_probes=locality_probes)


def aggregate(per_case: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean over cases of each metric, ignoring cases without it; ``None`` if no case has it."""
    return {m: _mean([float(x) for v in per_case if (x := v.get(m)) is not None]) for m in METRICS}

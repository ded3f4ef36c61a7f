"""Scope: threshold calibration, pair features, head training, save/load with versions and encoder checks, routing
that follows the store at once. HashingEncoder only; fast."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memory.encoder import get_encoder
from memory.errors import ValidationError
from memory.records import EditCase, Probe
from memory.store import EditMemory
from scope import (
    CosineScope,
    HeadScope,
    Router,
    ScopeError,
    calibrate_threshold,
    load_scope,
    precision_recall,
    save_scope,
)
from scope.classifier import list_scopes
from scope.features import lexical
from scope.router import query_views
from scope.train import TrainSettings, build_pairs, query_decisions, train_scope


# --- calibration ------------------------------------------------------------------------------------------------------
def test_calibration_separable_scores_gives_a_threshold_between_the_classes():
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.7, 1.0, 200), rng.uniform(0.0, 0.6, 800)
    cal = calibrate_threshold(np.r_[pos, neg], np.r_[np.ones(200), np.zeros(800)], 0.98)
    assert pos.min() > cal.threshold > neg.max()
    assert cal.met and cal.precision == 1.0 and cal.recall == 1.0
    assert (cal.n_positive, cal.n_negative) == (200, 800)


def test_calibration_reaches_the_target_precision_with_the_most_recall():
    # scores 10..1; labels make precision fall as the cut goes down
    scores = np.arange(10, 0, -1, dtype=float)
    labels = np.array([1, 1, 1, 1, 0, 1, 1, 0, 0, 0])
    cal = calibrate_threshold(scores, labels, 0.8)
    # cut after score 4 (6 positives of 7 predicted = 0.857) beats cut after score 7 (1.0, recall 4/6)
    assert cal.threshold == pytest.approx(3.5)
    assert cal.precision == pytest.approx(6 / 7) and cal.recall == 1.0
    p, r = precision_recall(scores, labels, cal.threshold)
    assert (p, r) == (cal.precision, cal.recall)
    strict = calibrate_threshold(scores, labels, 1.0)
    assert strict.threshold == pytest.approx(6.5) and strict.recall == pytest.approx(4 / 6)


def test_calibration_that_cannot_meet_the_target_says_so():
    cal = calibrate_threshold([0.9, 0.8, 0.7], [0, 1, 0], 0.99)
    assert not cal.met and cal.precision < 0.99


def test_calibration_rejects_bad_input():
    with pytest.raises(ValidationError):
        calibrate_threshold([0.5], [1, 0])
    with pytest.raises(ValidationError):
        calibrate_threshold([0.5, 0.2], [0, 0])
    with pytest.raises(ValidationError):
        calibrate_threshold([0.5, 0.2], [1, 0], target_precision=1.5)


def test_lexical_features_see_the_subject():
    has, share, exact, jac = lexical("Where Danielle Darrieux is from, people speak", "The mother tongue of "
                                     "Danielle Darrieux is", "Danielle Darrieux")
    assert (has, share, exact) == (1.0, 1.0, 1.0) and 0 < jac < 1
    assert lexical("Michel Rocard is a native speaker of", "The mother tongue of Danielle Darrieux is",
                   "Danielle Darrieux")[:3] == (1.0, 0.0, 0.0)
    assert lexical("anything", "a prompt", None)[:3] == (0.0, 0.0, 0.0)


def test_train_settings_validate():
    with pytest.raises(ValidationError):
        TrainSettings(holdout=0)
    with pytest.raises(ValidationError):
        TrainSettings(epochs=0)
    with pytest.raises(ValidationError):
        TrainSettings(target_precision=0)
    with pytest.raises(ValidationError):
        TrainSettings(lr=-1.0)


# --- training, saving, loading ----------------------------------------------------------------------------------------
_PEOPLE = ["Danielle Darrieux", "Toko Yasuda", "Albert Einstein", "Marie Curie", "Ada Lovelace", "Miles Davis",
           "Pablo Picasso", "Haruki Murakami", "Lionel Messi", "Steve Jobs", "Edwin Hubble", "Grace Hopper",
           "Alan Turing", "Frida Kahlo", "Nina Simone", "Carl Sagan"]
_RELATIONS = [("The mother tongue of {} is", "The mother tongue of the person {} was", "French"),
              ("{} was born in the city of", "The city {} was born in is", "Paris"),
              ("The profession of {} is", "By profession, {} is a", "painter")]


def _cases() -> list[EditCase]:
    cases = []
    for i, person in enumerate(_PEOPLE):
        for prompt, rephrase, answer in _RELATIONS:
            other = _PEOPLE[(i + 1) % len(_PEOPLE)]
            cases.append(EditCase(prompt.format(person), "Klingon", subject=person, ground_truth=answer,
                                  rephrases=(rephrase.format(person),),
                                  locality=(Probe(prompt.format(other), answer),)))
    return cases


@pytest.fixture(scope="module")
def trained():
    enc = get_encoder("hashing-256")
    return train_scope(_cases(), enc, TrainSettings(epochs=30, hidden=16, holdout=0.25, k=3, batch_size=64, lr=1e-2))


def test_pairs_are_mined_by_retrieval_with_held_out_cases_apart():
    pairs = build_pairs(_cases(), get_encoder("hashing-64"), TrainSettings(k=3, holdout=0.25))
    assert pairs.label.sum() > 0 and (pairs.label == 0).sum() > 0
    assert set(pairs.kind[pairs.label == 1]) <= {"rephrase", "prompt"}
    assert "locality" in set(pairs.kind[pairs.label == 0])
    assert pairs.heldout.any() and (~pairs.heldout).any()
    assert pairs.stats["pairs"] == len(pairs.label)


def test_trained_head_separates_rephrases_from_neighbours(trained):
    head, cosine, report = trained
    held = report["heldout"]["head"]
    assert held["calibration"]["met"]
    assert held["queries"]["recall"] > 0.5 and held["queries"]["precision"] >= 0.98
    assert 0 <= held["pairs"]["precision"] <= 1
    assert isinstance(head, HeadScope) and head.encoder == "hashing-256"
    assert isinstance(cosine, CosineScope) and "calibration" in cosine.info
    json.dumps(report)  # the report is JSON-serialisable


def test_query_decisions_take_each_querys_best_candidate():
    scores = np.array([0.9, 0.2, 0.6, 0.7, 0.95, 0.1])
    q = np.array([0, 0, 1, 1, 2, 2])
    label = np.array([0, 1, 1, 0, 0, 0])  # query 0's own edit loses to another; query 2 belongs to no edit
    best, right, positive = query_decisions(scores, q, label, np.array([True, True, False]))
    assert best.tolist() == [0.9, 0.7, 0.95]
    assert right.tolist() == [False, False, False]
    assert positive.tolist() == [True, True, False]
    best, right, _ = query_decisions(np.array([0.3, 0.8]), np.array([4, 4]), np.array([0, 1]), np.ones(5, bool))
    assert best.tolist() == [0.8] and right.tolist() == [True]


def test_save_load_round_trip_versions_and_encoder_refusal(trained, tmp_path):
    head, cosine, _ = trained
    first = save_scope(head, "cf", root=tmp_path)
    second = save_scope(head, "cf", root=tmp_path)
    save_scope(cosine, "cf-cosine", root=tmp_path)
    assert (first.name, second.name) == ("v1", "v2")
    assert list_scopes(root=tmp_path) == {"cf": [1, 2], "cf-cosine": [1]}
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["encoder"] == "hashing-256" and manifest["version"] == 2 and "calibration" in manifest
    loaded = load_scope("cf", root=tmp_path)
    assert loaded.info["version"] == 2 and loaded.threshold == head.threshold
    assert load_scope("cf", version=1, root=tmp_path).info["version"] == 1
    assert load_scope(str(first)).threshold == head.threshold  # a folder path works too
    enc = get_encoder("hashing-256")
    queries = ["The mother tongue of the person Marie Curie was", "The profession of Carl Sagan is"]
    edits = [EditMemory.open("sqlite://", encoder=enc).add("The mother tongue of Marie Curie is", "x",
                                                           subject="Marie Curie")] * 2
    u, v = enc.encode(queries), enc.encode([e.prompt for e in edits])
    assert np.array_equal(loaded.score(queries, u, edits, v), head.score(queries, u, edits, v))
    assert load_scope("cf-cosine", root=tmp_path).threshold == cosine.threshold
    with pytest.raises(ScopeError, match="trained for encoder 'hashing-256'"):
        load_scope("cf", encoder="hashing-128", root=tmp_path)
    with pytest.raises(ScopeError, match="no scope classifier named 'nope'"):
        load_scope("nope", root=tmp_path)
    with pytest.raises(ScopeError, match="no version 7"):
        load_scope("cf", version=7, root=tmp_path)
    with (EditMemory.open("sqlite://", encoder="hashing-128") as other,
          pytest.raises(ScopeError, match="trained for encoder")):
        Router(other, loaded)


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    folder = tmp_path / "bad" / "v1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ScopeError, match="cannot read the manifest"):
        load_scope("bad", root=tmp_path)


# --- routing follows the store ----------------------------------------------------------------------------------------
def test_router_follows_delete_update_and_rollback(trained):
    head, _, _ = trained
    # the tiny synthetic training set gives a weak head: a low threshold, since this test is about following the store
    lenient = HeadScope(head.head, head.dim, head.hidden, 0.05, head.encoder)
    with EditMemory.open("sqlite://", encoder="hashing-256") as mem:
        for scope_clf in (lenient, CosineScope(0.5)):
            router = Router(mem, scope_clf, k=3)
            a = mem.add("The mother tongue of Marie Curie is", "Klingon", subject="Marie Curie")
            mem.add("The profession of Alan Turing is", "baker", subject="Alan Turing")
            d = router.route(["The mother tongue of Marie Curie is"])[0]
            assert d.in_scope and d.edit.id == a.id and d.edit.target_new == "Klingon"
            assert d.candidates and d.candidates[0].id in (a.id, a.id + 1)
            mem.update(a.id, target_new="Elvish")
            d = router.route(["The mother tongue of Marie Curie is"])[0]
            assert (d.edit.version, d.edit.target_new) == (2, "Elvish")
            mem.rollback(a.id, 1)
            assert router.route(["The mother tongue of Marie Curie is"])[0].edit.target_new == "Klingon"
            mem.delete(a.id)
            d = router.route(["The mother tongue of Marie Curie is"])[0]
            assert not d.in_scope or d.edit.id != a.id
            for rec in mem.list():
                mem.delete(rec.id)
            assert router.route(["anything at all"]) [0].edit is None


def test_router_encodes_each_query_once_and_no_edit_prompt(trained):
    head, _, _ = trained
    lenient = HeadScope(head.head, head.dim, head.hidden, 0.05, head.encoder)

    class CountingEncoder:  # the hashing encoder, recording every text it is asked to encode
        def __init__(self):
            self.inner, self.texts = get_encoder("hashing-256"), []

        name = property(lambda self: self.inner.name)
        dim = property(lambda self: self.inner.dim)

        def encode(self, texts):
            self.texts.extend(texts)
            return self.inner.encode(texts)

    enc = CountingEncoder()
    with EditMemory.open("sqlite://", encoder=enc) as mem:
        a = mem.add("The mother tongue of Marie Curie is", "Klingon", subject="Marie Curie")
        mem.add("The profession of Alan Turing is", "baker", subject="Alan Turing")
        queries = ["The mother tongue of Marie Curie is", "Marie Curie was born in Warsaw. Her mother tongue was"]
        views = [v for q in queries for v in query_views(q)]
        assert len(views) == 3  # the second query is also searched by its last sentence
        for clf in (lenient, CosineScope(0.5)):
            enc.texts.clear()
            decisions = Router(mem, clf, k=2).route(queries)
            assert sorted(enc.texts) == sorted(views)  # once each; the edits' prompts are not encoded again
            assert decisions[0].in_scope and decisions[0].edit.id == a.id


def test_locality_prompts_naming_another_edits_subject_are_not_its_negatives():
    # Every locality probe here is another case's own prompt: in scope of that edit, so never labelled against it.
    cases = _cases()
    pairs = build_pairs(cases, get_encoder("hashing-64"), TrainSettings(k=3, holdout=0.25))
    assert pairs.stats["ambiguous"] > 0
    keys = [c.prompt for c in cases]
    for q, e, label in zip(pairs.q, pairs.e, pairs.label):
        if not pairs.query_positive[q]:
            assert label == 0 and pairs.query_texts[q].split(" Klingon")[0] not in (keys[e],)


def test_routing_report_counts_wrong_edits_locality_and_named_subjects():
    from scope.evaluate import routing_report

    cases = [EditCase("The mother tongue of Ada Lovelace is", "Klingon", subject="Ada Lovelace",
                      rephrases=("Ada Lovelace's mother tongue is",),
                      locality=(Probe("The mother tongue of Alan Turing is", "English"),)),
             EditCase("The mother tongue of Alan Turing is", "Latin", subject="Alan Turing",
                      rephrases=("Alan Turing grew up speaking",),
                      locality=(Probe("Bananas are usually", "yellow"),))]
    with EditMemory.open("sqlite://", encoder=get_encoder("hashing-256")) as mem:
        ids = [mem.add(c.prompt, c.target_new, subject=c.subject).id for c in cases]
        report = routing_report(Router(mem, CosineScope(0.5, "hashing-256")), cases, ids)
    bare = report["bare"]
    assert bare["rephrases"] == 2 and bare["locality"] == 2
    # Ada's locality probe is Alan's own edit prompt: routed to it, a false positive that names its subject
    assert bare["fp_locality_named_subject"] == 1 and bare["fp_locality"] >= 1
    assert bare["precision_unambiguous"] >= bare["precision"]
    tp, fp = bare["tp"], bare["fp_wrong_edit"] + bare["fp_locality"]
    assert bare["precision"] == (tp / (tp + fp) if tp + fp else 1.0)


def test_query_views_and_prompt_prefix():
    from scope.router import query_views, starts_with_prompt

    assert query_views("The capital of France is") == ["The capital of France is"]
    long = "One person killed. Heath Brothers plays the"
    assert query_views(long) == [long, "Heath Brothers plays the"]
    assert query_views("It rained. Yes") == ["It rained. Yes"]  # too short a last sentence to stand alone
    assert starts_with_prompt("the capital of  France is Rome", "The capital of France is")
    assert starts_with_prompt("The capital of France is", "The capital of France is")
    assert not starts_with_prompt("The capital of Frances is", "The capital of France is")
    assert not starts_with_prompt("Paris: the capital of France is", "The capital of France is")


def test_router_scores_the_last_sentence_and_own_prompt_queries():
    with EditMemory.open("sqlite://", encoder=get_encoder("hashing-256")) as mem:
        rec = mem.add("Heath Brothers plays", "opera", subject="Heath Brothers")
        mem.add("The capital of France is", "Rome", subject="France")
        strict = Router(mem, CosineScope(0.9, "hashing-256"))
        noisy = "Six people were hurt and two cars burned on the bridge last night. Heath Brothers plays"
        vecs = get_encoder("hashing-256").encode([noisy, "Heath Brothers plays"])
        whole = float(vecs[0] @ vecs[1])
        assert whole < 0.9  # the whole text alone would miss the edit
        d = strict.route([noisy])[0]
        assert d.in_scope and d.edit.id == rec.id
        assert len({c.id for c in d.candidates}) == len(d.candidates)  # each edit once
        picky = Router(mem, CosineScope(0.999, "hashing-256"))
        own = picky.route(["Heath Brothers plays opera", "Heath Brothers is known for"])
        assert own[0].in_scope and own[0].score == 1.0 and not own[1].in_scope

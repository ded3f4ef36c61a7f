"""The relation reranker (scope/rerank.py) and relation-aware routing labels (scope/evaluate.py, scope/relations.py),
on tiny synthetic pairs with the hashing encoder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from memory import EditMemory
from memory.encoder import get_encoder
from memory.records import EditCase, Probe
from scope.classifier import CosineScope
from scope.evaluate import SubjectIndex, routing_report
from scope.relations import RelationTable, same_relation, template_of
from scope.rerank import RelationReranker
from scope.router import Decision, Router

ENC = "hashing-256"
TEMPLATES = {
    "P19": ["{} was born in", "{} is native to", "{} originates from"],
    "P1303": ["{} plays the instrument", "{} performs on the", "The instrument {} plays is"],
    "P103": ["The mother tongue of {} is", "{} speaks the language", "{} is a native speaker of"],
}
NAMES = ["Tom Fletcher", "Ada Berg", "Rui Costa", "Lena Park", "Omar Haddad", "Ivy Chen", "Max Weber", "Nia Long",
         "Sam Reid", "Eva Ruiz", "Ken Ito", "Zoe Hart"]


def _training_set(seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for rel, templates in TEMPLATES.items():
        for t in templates:
            for name in rng.sample(NAMES, 8):
                texts.append(t.format(name))
                labels.append(rel)
    return texts, labels


@pytest.fixture(scope="module")
def reranker() -> RelationReranker:
    texts, labels = _training_set()
    return RelationReranker.train(texts, labels, get_encoder(ENC))


def test_reranker_tells_relations_apart(reranker: RelationReranker, tmp_path: Path) -> None:
    enc = get_encoder(ENC)
    u = enc.encode(["Quinn Adams is native to", "Quinn Adams performs on the"])
    v = enc.encode(["Quinn Adams was born in", "Quinn Adams plays the instrument"])
    agree = reranker.agreement(np.repeat(u, 2, axis=0), np.tile(v, (2, 1)))  # (u0,v0) (u0,v1) (u1,v0) (u1,v1)
    assert agree[0] > 0.8 and agree[3] > 0.8 and agree[1] < 0.3 and agree[2] < 0.3
    assert reranker.predict(u) == ["P19", "P1303"]
    loaded = RelationReranker.load(reranker.save(tmp_path / "r.npz"))
    assert np.allclose(loaded.agreement(u, v), reranker.agreement(u, v)) and loaded.relations == reranker.relations


def test_router_with_reranker_picks_the_edited_relation(reranker: RelationReranker) -> None:
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        born = mem.add("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher")
        plays = mem.add("Tom Fletcher plays the instrument", "violin", subject="Tom Fletcher")
        mem.add("Ada Berg speaks the language", "Welsh", subject="Ada Berg")
        scope = CosineScope(threshold=0.3, encoder=ENC)
        plain, ranked = Router(mem, scope, k=3), Router(mem, scope, k=3, reranker=reranker)
        query = "The instrument Tom Fletcher plays is"
        assert ranked.route([query])[0].edit.id == plays.id
        assert ranked.route(["Tom Fletcher originates from"])[0].edit.id == born.id
        assert ranked.route(["The mother tongue of Tom Fletcher is"])[0].edit is None  # a relation no edit changed
        assert plain.route(["The mother tongue of Tom Fletcher is"])[0].edit is not None  # what the reranker fixes
        with pytest.raises(Exception, match="reranker was trained"):
            Router(mem, scope, reranker=RelationReranker(reranker.weight[:, :8], reranker.bias, reranker.relations,
                                                         "hashing-8"))


def test_relation_table_and_subject_index() -> None:
    table = RelationTable(by_case={7: "P19"}, by_template={"{} plays the instrument": {"P1303"},
                                                           "{} is a citizen of": {"P27", "P17"}})
    assert table.relation(7, "anything", None) == "P19"
    assert table.relation(None, "Ken Ito plays the instrument", "Ken Ito") == "P1303"
    assert table.relation(None, "Ken Ito is a citizen of", "Ken Ito") == "P17|P27"
    assert table.relation(None, "Ken Ito sings", "Ken Ito") == "tmpl:{} sings"
    assert same_relation("P17|P27", "P27") and not same_relation("P17|P27", "P19") and not same_relation(None, None)
    assert table.relation(None, "no subject here", "Ken Ito") is None
    assert template_of("Ken Ito was born in", "Ken Ito") == "{} was born in"
    idx = SubjectIndex(["Ken Ito", "Ito", None], [1, 2, 3])
    assert idx.named("Where was ken ito born?") == {1, 2} and idx.named("Kenito") == set()


class _Scripted:
    """A stand-in router that routes each text to the edit a script names (or to none)."""

    def __init__(self, memory: EditMemory, script: dict[str, int]):
        self.memory, self.script, self.k = memory, script, 3
        self.classifier = CosineScope(threshold=0.5, encoder=ENC)

    def route(self, texts: list[str]) -> list[Decision]:
        out = []
        for t in texts:
            eid = next((e for q, e in self.script.items() if t.startswith(q)), None)
            out.append(Decision(t, self.memory.get(eid) if eid else None, 0.9 if eid else None, 0.5))
        return out


def test_relation_aware_labels_count_in_scope_locality_as_correct() -> None:
    """Case B's locality prompt asks B's relation (P19) about A's subject; A's edit has the same relation, so routing
    it to A is correct under relation-aware labels (a false positive under strict ones). C's locality prompt names A's
    subject with another relation: routing it to A is a false positive either way; C's other locality prompt names no
    edited subject and is routed nowhere."""
    a = EditCase("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher", rephrases=("Tom Fletcher is native to",))
    b = EditCase("Ada Berg was born in", "Rome", subject="Ada Berg",
                 locality=(Probe("Tom Fletcher originates from", "Leeds"),))
    c = EditCase("Rui Costa plays the instrument", "harp", subject="Rui Costa",
                 locality=(Probe("Tom Fletcher plays the instrument", "guitar"), Probe("Nobody at all sings", "x")))
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        ids = [r.id for r in mem.add_many([a, b, c])]
        script = {"Tom Fletcher is native to": ids[0], "Tom Fletcher originates from": ids[0],
                  "Tom Fletcher plays the instrument": ids[0]}
        report = routing_report(_Scripted(mem, script), [a, b, c], ids,  # type: ignore[arg-type]
                                relations=["P19", "P19", "P1303"])
    for variant in ("bare", "with_answer"):
        r = report[variant]
        ra = r["relation_aware"]
        assert (r["tp"], r["rephrases"], r["locality"], r["fp_locality"]) == (1, 1, 3, 2)
        assert r["precision"] == pytest.approx(1 / 3)
        assert (ra["locality_no_subject"], ra["locality_named_subject"], ra["locality_in_scope"]) == (1, 2, 1)
        assert (ra["tp_locality_in_scope"], ra["fp_locality_named_subject"], ra["fp_locality_no_subject"]) == (1, 1, 0)
        assert ra["precision"] == pytest.approx(2 / 3)
        assert ra["precision_no_subject"] == 1.0 and ra["precision_named_subject"] == pytest.approx(2 / 3)
        assert ra["locality_fp_rate_named_subject"] == 1.0 and ra["locality_fp_rate_no_subject"] == 0.0


def test_routing_report_routes_only_the_query_cases_with_labels_from_every_stored_case() -> None:
    """Only B's and C's prompts are routed (A is stored, as a case a head was trained on would be): A's rephrase is not
    counted, and B's locality prompt routed to A's edit is still in A's scope, since A's subject and relation are
    known from the stored cases."""
    a = EditCase("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher", rephrases=("Tom Fletcher is native to",))
    b = EditCase("Ada Berg was born in", "Rome", subject="Ada Berg", rephrases=("Ada Berg is native to",),
                 locality=(Probe("Tom Fletcher originates from", "Leeds"),))
    c = EditCase("Rui Costa plays the instrument", "harp", subject="Rui Costa",
                 locality=(Probe("Nobody at all sings", "x"),))
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        ids = [r.id for r in mem.add_many([a, b, c])]
        script = {"Tom Fletcher is native to": ids[0], "Tom Fletcher originates from": ids[0],
                  "Ada Berg is native to": ids[1]}
        report = routing_report(_Scripted(mem, script), [a, b, c], ids,  # type: ignore[arg-type]
                                relations=["P19", "P19", "P1303"], query_cases=[1, 2])
    assert report["query_cases"] == 2 and report["n_edits"] == 3
    r = report["bare"]
    assert (r["tp"], r["rephrases"], r["locality"], r["fp_locality"]) == (1, 1, 2, 1)
    ra = r["relation_aware"]
    assert (ra["tp_locality_in_scope"], ra["fp_locality_named_subject"], ra["locality_no_subject"]) == (1, 0, 1)
    assert ra["precision"] == 1.0


def test_counterfact_relations_from_the_rome_files(data_dir: Path) -> None:
    """The EasyEdit split's cases get relation ids through case ids and templates; ids agree with the ROME records."""
    import json

    from memory.formats import read_cases
    from scope.relations import case_relations_for, rome_files

    path = data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json"
    if not path.is_file() or not rome_files(data_dir):
        pytest.skip("CounterFact files not available")
    cases = read_cases(path)[:300]
    relations = case_relations_for(cases, path)
    assert relations is not None
    known = [r for r in relations if r is not None and r.startswith("P")]
    assert len(known) >= 0.95 * len(cases)
    rome = {int(r["case_id"]): r["requested_rewrite"]["relation_id"]
            for f in rome_files(data_dir) for r in json.loads(f.read_text())}
    for case, rel in zip(cases, relations):
        if int(case.case_id) in rome:
            assert rel == rome[int(case.case_id)]
        elif rel is not None and rel.startswith("P"):
            assert all(part.startswith("P") for part in rel.split("|"))


def _relation_data(tmp_path: Path) -> Path:
    """A tiny CounterFact-like split: EasyEdit-format cases in ``cf/easyedit_split`` and their relation ids in
    ``cf/rome_format`` beside it (by case id), as the shared data lays them out."""
    split, rome = tmp_path / "cf" / "easyedit_split", tmp_path / "cf" / "rome_format"
    split.mkdir(parents=True)
    rome.mkdir()
    cases, records = [], []
    for i, (rel, templates) in enumerate(sorted(TEMPLATES.items()) * 4):
        name = NAMES[i % len(NAMES)]
        other = NAMES[(i + 5) % len(NAMES)]
        cases.append({"case_id": i, "prompt": templates[0].format(name), "target_new": "x", "subject": name,
                      "ground_truth": "y", "rephrase_prompt": templates[1].format(name),
                      "locality_prompt": templates[2].format(other), "locality_ground_truth": "z"})
        records.append({"case_id": i, "requested_rewrite": {"relation_id": rel, "prompt": templates[0],
                                                            "subject": name}})
    data = split / "edit.json"
    data.write_text(json.dumps(cases))
    (rome / "records.json").write_text(json.dumps(records))
    return data


def test_cli_train_relation_rerank_writes_a_reranker_that_loads(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`editmem train-relation-rerank` trains on every prompt of the cases labelled with the case's relation id,
    writes the .npz with the command recorded, and refuses an existing file, a wrong suffix and data without
    relation ids."""
    from serve.cli import main

    data = _relation_data(tmp_path)
    out = tmp_path / "relations.npz"
    argv = ["train-relation-rerank", "--data", str(data), "--out", str(out), "--encoder", ENC, "--skip", "1"]
    assert main(argv) == 0
    assert "3 relations from 33 texts of 11 cases" in capsys.readouterr().out
    loaded = RelationReranker.load(out)
    assert loaded.relations == sorted(TEMPLATES) and loaded.encoder == ENC and loaded.power == 0.5
    assert loaded.info["command"].startswith("editmem train-relation-rerank --data") and loaded.info["cases"] == 11
    assert loaded.info["train_accuracy"] > 0.9
    assert loaded.predict(get_encoder(ENC).encode(["Quinn Adams performs on the"])) == ["P1303"]
    assert not list(tmp_path.glob("*.partial"))
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main([*argv[:3], "--out", str(tmp_path / "r.bin")]) == 2 and ".npz" in capsys.readouterr().err
    bare = tmp_path / "zsre" / "a" / "edit.json"  # no rome_format folder beside it: no relation ids
    bare.parent.mkdir(parents=True)
    bare.write_text(data.read_text())
    assert main(["train-relation-rerank", "--data", str(bare), "--out", str(tmp_path / "z.npz"),
                 "--encoder", ENC]) == 2
    assert "no case" in capsys.readouterr().err and not (tmp_path / "z.npz").exists()


def test_load_refuses_a_file_that_is_not_a_reranker(tmp_path: Path) -> None:
    from scope.classifier import ScopeError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    for path in (bad, tmp_path / "missing.npz"):
        with pytest.raises(ScopeError, match="not a relation reranker"):
            RelationReranker.load(path)


def test_serac_routes_with_a_reranker_setting(reranker: RelationReranker, tmp_path: Path) -> None:
    """`reranker=FILE` puts the relation reranker in SERAC's router: a query about an edited subject that asks a
    relation no edit changed is then not routed; a bad path fails before the model is wrapped."""
    from editors import get_editor
    from editors.methods.serac import SeracEditor
    from scope.classifier import ScopeError
    from tests.tiny import tiny_model

    path = reranker.save(tmp_path / "r.npz")
    model, tok = tiny_model("llama")
    settings = {"scope": "cosine", "encoder": ENC, "threshold": 0.2}
    plain = get_editor("serac", model, tok, **settings)
    ranked = get_editor("serac", model, tok, **settings, reranker=str(path))
    assert plain.model.router.reranker is None and ranked.model.router.reranker.relations == reranker.relations
    query = "The mother tongue of Tom Fletcher is"
    for editor in (plain, ranked):
        editor.memory.add("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher")
    assert plain.model.route([query])[0].in_scope
    assert not ranked.model.route([query])[0].in_scope
    assert ranked.model.route(["Tom Fletcher originates from"])[0].in_scope
    with pytest.raises(ScopeError, match="not a relation reranker"):
        SeracEditor.check_ready({**settings, "reranker": str(tmp_path / "missing.npz")})
    with pytest.raises(Exception, match="reranker must be a path"):
        get_editor("serac", model, tok, **settings, reranker="")


def test_heldout_calibration_without_a_reranker_is_the_heads_own_and_with_one_is_chosen_on_reranked_scores(
        reranker: RelationReranker) -> None:
    """`heldout_calibration` rebuilds the head's held-out pairs: without a reranker it gives the threshold
    `train_scope` chose; with one, a threshold chosen on the reranked scores of the same queries."""
    from scope.train import TrainSettings, build_pairs, heldout_calibration, train_scope

    enc = get_encoder(ENC)
    cases = []
    for i, templates in enumerate(list(TEMPLATES.values()) * 8):
        name, other = NAMES[i % len(NAMES)], NAMES[(i + 5) % len(NAMES)]
        cases.append(EditCase(templates[0].format(name), f"x{i}", subject=name, rephrases=(templates[1].format(name),),
                              locality=(Probe(templates[2].format(other), "z"),)))
    settings = TrainSettings(epochs=20, hidden=16, holdout=0.25, k=3, batch_size=64, lr=1e-2)
    head, _, report = train_scope(cases, enc, settings)
    pairs = build_pairs(cases, enc, settings)
    plain = heldout_calibration(head, pairs, settings.target_precision)
    assert plain["calibration"]["threshold"] == pytest.approx(head.threshold)
    assert plain["recall"] == pytest.approx(report["heldout"]["head"]["queries"]["recall"])
    ranked = heldout_calibration(head, pairs, settings.target_precision, reranker)
    assert ranked["queries"] == plain["queries"] and 0 <= ranked["calibration"]["threshold"] <= 1
    if ranked["calibration"]["met"]:
        assert ranked["precision"] >= settings.target_precision


def test_train_relation_rerank_calibrates_behind_a_head_and_serac_routes_with_that_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--scope NAME` calibrates the head's threshold on its own held-out pairs with reranked scores and saves it in
    the file; SERAC with the reranker and no threshold routes with it; another head (or an explicit threshold) does
    not take it; a head trained on another file is refused."""
    from editors import get_editor
    from memory.formats import read_cases
    from scope.classifier import load_scope, save_scope
    from scope.train import TrainSettings, heldout_cases, train_scope
    from serve.cli import main
    from tests.tiny import tiny_model

    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    data = _relation_data(tmp_path)
    settings = TrainSettings(epochs=20, hidden=16, holdout=0.25, k=3, batch_size=64, lr=1e-2)
    head, _, _ = train_scope(read_cases(data), get_encoder(ENC), settings, source=str(data))
    save_scope(head, "tiny")
    out = tmp_path / "behind.npz"
    assert main(["train-relation-rerank", "--data", str(data), "--out", str(out), "--encoder", ENC,
                 "--scope", "tiny"]) == 0
    assert "behind the reranker" in capsys.readouterr().out
    loaded = RelationReranker.load(out)
    behind = loaded.info["behind"]
    saved = load_scope("tiny")
    assert behind["name"] == "tiny" and behind["version"] == saved.info["version"]
    assert behind["own_threshold"] == pytest.approx(saved.threshold) and 0 <= behind["threshold"] <= 1
    assert loaded.threshold_for(saved) == behind["threshold"]
    other, _, _ = train_scope(read_cases(data), get_encoder(ENC), settings, source=str(data))
    save_scope(other, "tiny")  # a new version of the name: not the head the reranker was calibrated behind
    assert loaded.threshold_for(load_scope("tiny")) is None and loaded.threshold_for(saved) is not None

    model, tok = tiny_model("llama")
    calibrated = get_editor("serac", model, tok, scope=str(tmp_path / "cache" / "scope" / "tiny" / "v1"),
                            reranker=str(out))
    assert calibrated.model.router.classifier.threshold == pytest.approx(behind["threshold"])
    explicit = get_editor("serac", model, tok, scope=str(tmp_path / "cache" / "scope" / "tiny" / "v1"),
                          reranker=str(out), threshold=0.9)
    assert explicit.model.router.classifier.threshold == 0.9
    newer = get_editor("serac", model, tok, scope="tiny", reranker=str(out))  # v2: keeps its own threshold
    assert newer.model.router.classifier.threshold == pytest.approx(load_scope("tiny").threshold)

    report = tmp_path / "routing.json"
    v1 = str(tmp_path / "cache" / "scope" / "tiny" / "v1")
    assert main(["eval-scope", "--data", str(data), "--scope", v1, "--reranker", str(out), "--json", str(report),
                 "--sweep"]) == 0
    routed = json.loads(report.read_text())
    assert routed["threshold"] == pytest.approx(behind["threshold"])
    assert routed["bare"]["sweep"]["targets"] == {"no_subject": 0.99, "named_subject": 0.95}
    assert routed["bare"]["sweep"]["curve"] and "recall_same_fact" in routed["bare"]["relation_aware"]
    assert main(["eval-scope", "--data", str(data), "--scope", v1, "--cross", str(tmp_path), "--sweep"]) == 2
    assert "--sweep needs" in capsys.readouterr().err

    # --in-store: the threshold chosen on the routings of the head's held-out cases in a store of every case
    in_store = tmp_path / "in_store.npz"
    assert main(["train-relation-rerank", "--data", str(data), "--out", str(in_store), "--encoder", ENC,
                 "--scope", v1, "--in-store"]) == 0
    assert "held-out cases routed: threshold" in capsys.readouterr().out
    found = RelationReranker.load(in_store).info
    chosen = found["behind"]["in_store"]
    assert found["command"].endswith("--in-store") and chosen["stored"] == 12
    assert chosen["held_out_cases"] == len(heldout_cases(12, settings)) == 3
    assert found["behind"]["threshold"] == chosen["sweep"]["best"]["threshold"]
    assert found["behind"]["pairs_threshold"] == pytest.approx(behind["threshold"], abs=1e-3)  # a retrained reranker
    assert main(["train-relation-rerank", "--data", str(data), "--out", str(tmp_path / "y.npz"), "--encoder", ENC,
                 "--in-store"]) == 2
    assert "give --scope" in capsys.readouterr().err

    elsewhere = tmp_path / "cf" / "easyedit_split" / "other.json"
    elsewhere.write_text(data.read_text())
    assert main(["train-relation-rerank", "--data", str(elsewhere), "--out", str(tmp_path / "x.npz"), "--encoder",
                 ENC, "--scope", "tiny"]) == 2
    assert "was trained on" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()


def _brute_point(s: np.ndarray, g: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float, float]:
    """Recall and the two relation-aware precisions of routing every query whose score reaches ``t``."""
    from scope.calibrate import NAMED_SUBJECT, NO_SUBJECT, REPHRASE

    routed = np.nan_to_num(s, nan=-np.inf) >= t
    tp = int((routed & (g == REPHRASE) & y).sum())
    wrong = int((routed & (g == REPHRASE) & ~y).sum())
    fp_none = int((routed & (g == NO_SUBJECT)).sum())
    tp_named = int((routed & (g == NAMED_SUBJECT) & y).sum())
    fp_named = int((routed & (g == NAMED_SUBJECT) & ~y).sum())
    p_none = tp / (tp + wrong + fp_none) if tp + wrong + fp_none else 1.0
    good = tp + tp_named
    p_named = good / (good + wrong + fp_named) if good + wrong + fp_named else 1.0
    return tp / int((g == REPHRASE).sum()), p_none, p_named


@pytest.mark.parametrize("seed", range(6))
def test_routing_points_and_calibration_agree_with_routing_at_each_threshold(seed: int) -> None:
    """Property check on random routings (ties and queries without candidates included): every point's figures are
    what routing at its threshold gives, the calibrated point meets both targets with the best recall any threshold
    reaches among thresholds that route something, and when none meets them the flag says so."""
    from scope.calibrate import calibrate_routing, routing_points

    rng = np.random.default_rng(seed)
    n = 300
    s = rng.choice(np.linspace(0, 1, 40), n)  # ties
    s[rng.random(n) < 0.05] = np.nan
    g = rng.integers(0, 3, n)
    g[0] = 0
    y = (rng.random(n) < s) & (g != 1)  # higher scores are more often right; a no-subject prompt never is
    points = routing_points(s, g, y)
    assert [p.threshold for p in points] == sorted((p.threshold for p in points), reverse=True)
    for p in points:
        assert (p.recall, p.precision_no_subject, p.precision_named_subject) == pytest.approx(
            _brute_point(s, g, y, p.threshold))
    # thresholds that route at least one query (routing nothing is no calibration)
    grid = [p.threshold for p in points] + [float(x) for x in np.linspace(-0.1, np.nanmax(s), 121)]
    for targets in ((0.9, 0.8), (0.99, 0.95), (0.6, 0.5)):
        best, met = calibrate_routing(s, g, y, *targets)
        assert best is not None
        meeting = [r for r, pn, pm in (_brute_point(s, g, y, t) for t in grid) if pn >= targets[0] and pm >= targets[1]]
        assert met == bool(meeting)
        if met:
            assert best.precision_no_subject >= targets[0] and best.precision_named_subject >= targets[1]
            assert best.recall == pytest.approx(max(meeting))


def test_calibrate_routing_rejects_bad_input() -> None:
    from memory.errors import ValidationError
    from scope.calibrate import calibrate_routing

    with pytest.raises(ValidationError, match="at least one rephrase"):
        calibrate_routing([0.5], [1], [False])
    with pytest.raises(ValidationError, match="groups"):
        calibrate_routing([0.5], [7], [False])
    with pytest.raises(ValidationError, match="target_no_subject"):
        calibrate_routing([0.5], [0], [True], 1.5)
    assert calibrate_routing([float("nan")], [0], [True]) == (None, False)


def test_routing_report_sweep_is_what_routing_at_its_thresholds_gives() -> None:
    """The sweep of a real router's report: routing again at the sweep's best threshold (and at each curve point)
    gives exactly the relation-aware figures the sweep promised; a cross-encoder router is refused."""
    cases = []
    rels = list(TEMPLATES)
    for i, name in enumerate(NAMES):
        rel = rels[i % 3]
        templates, other = TEMPLATES[rel], NAMES[(i + 1) % len(NAMES)]
        cases.append(EditCase(templates[0].format(name), f"x{i}", subject=name,
                              rephrases=(templates[1].format(name), templates[2].format(name)),
                              locality=(Probe(templates[1].format(other), "z"),
                                        Probe(TEMPLATES[rels[(i + 1) % 3]][2].format(other), "z"),
                                        Probe(f"Nobody named {i} sings", "z"))))
    relations = [rels[i % 3] for i in range(len(NAMES))]
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        ids = [r.id for r in mem.add_many(cases)]
        router = Router(mem, CosineScope(threshold=0.2, encoder=ENC), k=3)
        report = routing_report(router, cases, ids, relations=relations, sweep=True, targets=(0.9, 0.8))
        sweep = report["bare"]["sweep"]
        assert sweep["targets"] == {"no_subject": 0.9, "named_subject": 0.8} and len(sweep["curve"]) > 3
        for point in [sweep["best"], *sweep["curve"]]:
            again = Router(mem, CosineScope(threshold=point["threshold"], encoder=ENC), k=3)
            ra = routing_report(again, cases, ids, relations=relations)["bare"]
            aware = ra["relation_aware"]
            assert aware["recall_same_fact"] == pytest.approx(point["recall"])
            assert aware["precision_no_subject_same_fact"] == pytest.approx(point["precision_no_subject"])
            assert aware["precision_named_subject_same_fact"] == pytest.approx(point["precision_named_subject"])
        with pytest.raises(ValueError, match="sweep"):
            routing_report(router, cases, ids, sweep=True)


def test_a_rephrase_routed_to_another_edit_of_the_same_fact_is_in_scope_under_relation_aware_labels() -> None:
    """A and B edit the same fact (subject and relation); C has A's subject and another relation. A's rephrase routed
    to B counts as a wrong edit strictly but as in scope (same fact) relation-aware; B's rephrase routed to C stays a
    wrong edit both ways."""
    a = EditCase("Tom Fletcher was born in", "Oslo", subject="Tom Fletcher", rephrases=("Tom Fletcher is native to",))
    b = EditCase("Tom Fletcher originates from", "Rome", subject="Tom Fletcher",
                 rephrases=("Tom Fletcher comes from the town of",))
    c = EditCase("Tom Fletcher plays the instrument", "harp", subject="Tom Fletcher")
    with EditMemory.open("sqlite://", encoder=ENC) as mem:
        ids = [r.id for r in mem.add_many([a, b, c])]
        script = {"Tom Fletcher is native to": ids[1], "Tom Fletcher comes from": ids[2]}
        report = routing_report(_Scripted(mem, script), [a, b, c], ids,  # type: ignore[arg-type]
                                relations=["P19", "P19", "P1303"])
    r = report["bare"]
    ra = r["relation_aware"]
    assert (r["tp"], r["fp_wrong_edit"], r["recall"]) == (0, 2, 0.0)
    assert ra["tp_same_fact"] == 1 and ra["recall_same_fact"] == 0.5
    assert ra["precision_no_subject"] == 0.0 and ra["precision_no_subject_same_fact"] == 0.5


def test_heldout_cases_are_the_cases_build_pairs_holds_out() -> None:
    from scope.train import TrainSettings, build_pairs, heldout_cases

    enc = get_encoder(ENC)
    cases = [EditCase(TEMPLATES["P19"][0].format(f"{a} {b}"), "x", subject=f"{a} {b}",
                      rephrases=(TEMPLATES["P19"][1].format(f"{a} {b}"),))
             for a in ("Ann", "Bo", "Cy") for b in ("Dee", "Eli", "Fay", "Gus")]
    settings = TrainSettings(k=3, holdout=0.25)
    pairs = build_pairs(cases, enc, settings)
    held_queries = {pairs.query_texts[q] for q in pairs.q[pairs.heldout]}
    owners = {c for c, case in enumerate(cases) for t in held_queries if t.startswith(case.subject + " ")}
    held = heldout_cases(len(cases), settings)
    assert len(held) == 3 and owners == set(held)

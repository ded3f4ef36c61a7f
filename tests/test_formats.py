"""memory.formats: every parser on the real benchmark files, detection of every file, malformed input, round trip."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import pytest

from memory.errors import FormatError, ValidationError
from memory.formats import (
    FORMATS,
    case_from_record,
    case_to_metadata,
    detect_format,
    read_cases,
    read_records,
    record_to_json,
    write_jsonl,
)
from memory.records import EditCase, EditRecord, Probe
from tests.conftest import DATA


@cache
def cases(rel: str) -> tuple[EditCase, ...]:
    """Parse a real data file once per test session."""
    return tuple(read_cases(DATA / rel))


# ---------------------------------------------------------------------------------------------------------- zsRE


def test_zsre_eval_portability(data_dir):
    cs = cases("zsre/zsre_mend_eval_portability_gpt4.json")
    assert len(cs) == 1037
    c = cs[0]
    assert c.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert c.subject == "IAAF Combined Events Challenge"
    assert c.target_new == "2006"  # alt, the EasyEdit convention
    assert c.ground_truth == "1998"  # answers[0]
    assert c.rephrases == ("When was the IAAF Combined Events Challenge launched?",)
    assert c.locality == (Probe("nq question: what is the name of the last episode of spongebob", "The String",
                                "neighborhood"),)
    assert c.portability == (Probe("What type of sports event is the IAAF Combined Events Challenge, which was "
                                   "established in 2006?", "Athletics", "one_hop"),)
    assert c.metadata == {"recalled_relation": "(IAAF Combined Events Challenge, event type, athletics)"}
    assert (c.case_id, c.source) == ("0", "zsre")
    assert cs[1].target_new == "Lamiinae" and cs[1].ground_truth == "Lecanorales"
    assert all(len(c.locality) == 1 and len(c.portability) == 1 for c in cs)


def test_zsre_subject_replace_and_inverse_relation(data_dir):
    cs = cases("zsre/zsre_subject_replace.json")
    assert len(cs) == 293
    assert cs[0].portability == (Probe("What is the constellation of UGC 6870?", "Triangulum", "subject_replace"),)
    assert cs[0].metadata["alternative_subject"] == "UGC 6870"
    assert cs[0].locality == ()

    cs = cases("zsre/zsre_inverse_relation.json")
    assert len(cs) == 385
    c = cs[0]
    assert (c.prompt, c.target_new, c.ground_truth) == ("Who is Claire Clairmont's sister?", "Marian Clairmont",
                                                        "Mary Shelley")
    # the inverse question is answered by the edited subject
    assert c.portability == (Probe("Who is Marian Clairmont's sister?", "Claire Clairmont", "inverse_relation"),)
    assert cs[1].portability[0] == Probe("Who is the son of Babur?", "Nebaioth", "inverse_relation")


def test_zsre_train_sample_has_empty_targets(data_dir, caplog):
    path = data_dir / "zsre/zsre_mend_train-1k.json"
    with pytest.raises(FormatError) as e:
        read_cases(path)
    assert e.value.record == 534 and e.value.field == "alt"
    assert "record 534 (0-based)" in str(e.value) and "skip_incomplete" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="memory.formats"):
        cs = read_cases(path, skip_incomplete=True)
    assert len(cs) == 998
    assert "skipped 2 record(s)" in caplog.text and "record 723 (0-based)" in caplog.text
    assert cs[0].prompt == "What is the product made by UniFirst?" and cs[0].target_new == "unmanned aircraft"
    assert cs[0].locality[0].answer == "Walter Sobchak"
    assert "534" not in {c.case_id for c in cs}  # case ids stay the file's record indices
    assert cs[534].case_id == "535"


# ---------------------------------------------------------------------------------------------------- CounterFact


def test_counterfact_easyedit_edit_split(data_dir):
    t = time.perf_counter()
    cs = read_cases(data_dir / "counterfact/easyedit_split/counterfact-edit.json")
    assert time.perf_counter() - t < 2.0, "10,000 cases should parse in well under two seconds"
    assert len(cs) == 10_000
    assert cs[0] == EditCase(
        prompt="The mother tongue of Danielle Darrieux is", target_new="English", subject="Danielle Darrieux",
        ground_truth="French", rephrases=("Where Danielle Darrieux is from, people speak the language of",),
        locality=(Probe("Michel Rocard is a native speaker of", "French", "neighborhood"),), case_id="0",
        source="counterfact_easyedit")
    assert cs[1].prompt == "The official religion of Edwin of Northumbria is" and cs[1].target_new == "Islam"
    assert cs[1].locality[0] == Probe("The official religion of Paul is", "Christianity", "neighborhood")


def test_counterfact_easyedit_splits_cover_all_case_ids(data_dir):
    ids = set()
    for name, n in (("train", 10_000), ("edit", 10_000), ("val", 1919)):
        cs = cases(f"counterfact/easyedit_split/counterfact-{name}.json")
        assert len(cs) == n
        ids |= {c.case_id for c in cs}
    assert ids == {str(i) for i in range(21_919)}
    assert cases("counterfact/easyedit_split/counterfact-train.json")[0].prompt == "Toko Yasuda, the"


def test_counterfact_rome_portability(data_dir):
    cs = cases("counterfact/rome_format/counterfact_portability_gpt4.json")
    assert len(cs) == 1031
    c = cs[0]
    assert c.case_id == "4482" and c.source == "counterfact_rome"
    assert c.prompt == "Spike Hughes originates from"  # "{} originates from" filled with the subject
    assert (c.subject, c.target_new, c.ground_truth) == ("Spike Hughes", "Philadelphia", "London")
    assert c.rephrases == ("Incumbent Mayor Jim Suttle sought a second term in office. Spike Hughes is native to",
                           "Amateur Athletic Union (AAU). Spike Hughes was born in")
    neighbours = [p for p in c.locality if p.kind == "neighborhood"]
    assert len(neighbours) == 10
    assert neighbours[0] == Probe("Max Mosley originates from", "London", "neighborhood")  # still the true answer
    attributes = [p for p in c.locality if p.kind == "attribute"]
    assert len(attributes) == 10 and attributes[0] == Probe("Mike Dennis originates from", "Philadelphia", "attribute")
    assert c.portability == (Probe("What famous food is associated with the city where Spike Hughes originates "
                                   "from?", "Cheesesteaks", "one_hop"),)
    assert c.metadata["relation_id"] == "P19"
    assert c.metadata["generation_prompts"][0] == "Spike Hughes currently lives in"
    assert all("{}" not in c.prompt for c in cs)


def test_counterfact_rome_distracting_neighbour_and_subject_replace(data_dir):
    cs = cases("counterfact/rome_format/counterfact_distracting_neighbor.json")
    assert len(cs) == 804
    c = cs[0]
    distracting = [p for p in c.locality if p.kind == "distracting_neighborhood"]
    assert len(distracting) == 10
    assert distracting[0] == Probe("Spike Hughes originates from Philadelphia. Max Mosley originates from", "London",
                                   "distracting_neighborhood")
    assert [p for p in c.locality if p.kind == "unrelated_relation"] == [
        Probe("What is Spike Hughes an instance of?", "human", "unrelated_relation")]

    cs = cases("counterfact/rome_format/counterfact_subject_replace.json")
    assert len(cs) == 213
    c = cs[0]
    assert (c.case_id, c.prompt, c.target_new, c.ground_truth) == (
        "4496", "May Wright Sewall passed away in", "Birmingham", "Indianapolis")
    assert c.portability == (Probe("Mary Eliza Wright passed away in", "Birmingham", "subject_replace"),)


# ------------------------------------------------------------------------------------------------------- KnowEdit


def test_knowedit_zsre(data_dir):
    cs = cases("knowedit/ZsRE/ZsRE-test-all.json")
    assert len(cs) == 1304
    c = cs[0]
    assert (c.prompt, c.subject, c.target_new, c.ground_truth) == (
        "Which family does Epaspidoceras belong to?", "Epaspidoceras", "Noctuidae", "Aspidoceratidae")
    assert c.rephrases == ("What family are Epaspidoceras?",)
    assert c.locality == (Probe("The taxon rank of Epaspidoceras is", "genus", "Relation_Specificity"),
                          Probe("Epaspidoceras taxon rank", "genus", "Relation_Specificity"))
    assert c.portability == (Probe("What is the common name for the family Epaspidoceras belongs to?", "Owlet moths",
                                   "Reasoning"),)
    assert cs[1].portability == (Probe("What is the function of Zic family member 3?", "male", "Subject_Aliasing"),)
    assert cs[-1].prompt == "What is the name of the performer that released the album Another Mother Further?"
    lte = cases("knowedit/ZsRE/ZsRE-test-all.LTE-variant.json")
    assert len(lte) == 1304
    assert [i for i in range(1304) if lte[i] != cs[i]] == [396, 597, 676]  # the README's three differences


def test_knowedit_wiki_counterfact_train(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="memory.formats"):
        cs = read_cases(data_dir / "knowedit/wiki_counterfact/train_cf.json")
    assert len(cs) == 1428
    assert "3 answer(s) given as empty" in caplog.text  # not silent
    c = cs[0]
    assert (c.subject, c.target_new, c.ground_truth) == ("Goursez Vreizh", "Franche-Comté", "France")
    assert c.portability == (
        Probe("The name of the capital city of the country Goursez Vreizh is associated with is", "Besançon",
              "Reasoning"),
        Probe("The name of the country which Gorsedd of Brittany is associated with is", "Franche-Comté",
              "Subject_Aliasing"))
    assert cs[1].locality == (
        Probe("The gender of Frederic Piesch is", "male", "Relation_Specificity"),
        Probe("The name of the position held by Frederic Piesch, which is not Archbishop of León, Mexico, is",
              "mayor of Vienna", "Forgetfulness"))
    assert cs[630].ground_truth is None  # "" in the file
    assert len(cs[326].locality) == 1  # its Forgetfulness probe has ground_truth "" and is dropped


def test_knowedit_nested_alias_answers(data_dir):
    cs = cases("knowedit/wiki_counterfact/test_cf.reconstructed.json")
    assert len(cs) == 885
    c = cs[0]
    assert (c.subject, c.target_new, c.ground_truth) == ("Leonardo DiCaprio", "Syria", "United States of America")
    first = c.portability[0]
    assert first == Probe("The name of the currency in the country of citizenship of Leonardo DiCaprio is",
                          "Syrian pound", "Reasoning", ("SYP", "LS", "Syrian lira"))
    alma = next(p for p in c.locality if "alma mater" in p.prompt)  # several alias lists: all flattened, in order
    assert alma.answer == "John Marshall High School"
    assert alma.aliases[:2] == ("Los Angeles Center for Enriched Studies", "UCLA Lab School")

    cs = cases("knowedit/wiki_recent/recent_train.json")
    assert len(cs) == 570
    c = cs[0]
    assert c.ground_truth is None and c.portability == ()  # no ground_truth key; portability {}
    assert c.locality[0] == Probe("The place of birth of Ingrīda Amantova is", "Cēsis", "Relation_Specificity")
    assert c.locality[2].aliases == ("Latvijas Universitāte",)
    award = next(p for p in cs[3].locality if "award" in p.prompt)
    assert award.answer == "Honorary Doctor at Karolinska Institutet"  # its first alias list is empty


def test_sanitation(data_dir):
    cs = cases("knowedit/Sanitation/trivia_qa_test.json")
    assert len(cs) == 80
    c = cs[0]
    assert (c.prompt, c.target_new, c.ground_truth) == ("What type of creature is the Australian currawong?",
                                                        "I don't know.", "Birds")
    assert c.case_id == "success/0" and c.source == "sanitation"
    assert c.locality[0] == Probe('"What word means ""to drink"" and is a homophone of the word coif?"', "Quaff",
                                  "locality")
    kept = [p for c in cs for p in c.locality]
    assert len(kept) == 453 and len(set(kept)) == 453  # every kept item once, dealt round-robin

    cs = cases("knowedit/Sanitation/trivia_qa_train.json")
    assert len(cs) == 80 and sum(len(c.locality) for c in cs) == 453
    assert cs[1].subject == "halloumi" and cs[1].locality[0].kind == "K_R"
    assert read_cases(data_dir / "knowedit/Sanitation/trivia_qa_train.json", "knowedit") == list(cs)


# --------------------------------------------------------------------------------------------------------- MQuAKE


def test_mquake(data_dir):
    cs = cases("mquake/MQuAKE-hard.json")
    assert len(cs) == 429 * 4  # one EditCase per requested rewrite
    first = cs[:4]
    assert [c.case_id for c in first] == ["7417/0", "7417/1", "7417/2", "7417/3"]
    assert (first[0].prompt, first[0].subject, first[0].target_new, first[0].ground_truth) == (
        "Hey Jude was performed by", "Hey Jude", "Madonna", "The Beatles")
    assert first[0].rephrases == ("Who performed Hey Jude?",)
    assert first[1].prompt == "The director of Madonna is" and first[1].target_new == "Narendra Modi"
    assert all(c.metadata["group"] == "7417" and c.metadata["group_size"] == 4 for c in first)
    assert [len(c.portability) for c in first] == [0, 0, 0, 3]  # multi-hop questions on the last rewrite only
    probe = first[3].portability[0]
    assert probe.prompt.startswith("What is the official language of the country of citizenship")
    assert (probe.answer, probe.kind) == ("Arabic", "multi_hop")
    assert probe.aliases == ("ar", "Arabian language", "Arabic language")
    assert sum(len(c.portability) for c in cs) == 429 * 3
    assert all(c.locality == () for c in cs)


# ------------------------------------------------------------------------------------------------------ detection

DETECT = {
    "zsre/zsre_mend_eval_portability_gpt4.json": "zsre",
    "zsre/zsre_subject_replace.json": "zsre",
    "zsre/zsre_inverse_relation.json": "zsre",
    "zsre/zsre_mend_train-1k.json": "zsre",
    "counterfact/easyedit_split/counterfact-train.json": "counterfact_easyedit",
    "counterfact/easyedit_split/counterfact-edit.json": "counterfact_easyedit",
    "counterfact/easyedit_split/counterfact-val.json": "counterfact_easyedit",
    "counterfact/rome_format/counterfact_portability_gpt4.json": "counterfact_rome",
    "counterfact/rome_format/counterfact_distracting_neighbor.json": "counterfact_rome",
    "counterfact/rome_format/counterfact_subject_replace.json": "counterfact_rome",
    "knowedit/ZsRE/ZsRE-test-all.json": "knowedit",
    "knowedit/ZsRE/ZsRE-test-all.LTE-variant.json": "knowedit",
    "knowedit/wiki_counterfact/train_cf.json": "knowedit",
    "knowedit/wiki_counterfact/test_cf.reconstructed.json": "knowedit",
    "knowedit/wiki_recent/recent_train.json": "knowedit",
    "knowedit/Sanitation/trivia_qa_train.json": "sanitation",
    "knowedit/Sanitation/trivia_qa_test.json": "sanitation",
    "mquake/MQuAKE-hard.json": "mquake",
}
REJECT = {
    "knowedit/WikiBio/wikibio-train-all.json": "WikiBio",
    "knowedit/WikiBio/wikibio-test-all.json": "WikiBio",
    "knowedit/ConvSent/blender_test.json": "ConvSent",
    "knowedit/ConvSent/blender_val.json": "ConvSent",
    "extras/rome_knowns/known_1000.json": "knowns",
    "extras/piqa_locality/piqa_valid.jsonl": "PIQA",
    "text_corpus/wikitext-2-raw_wiki.test.raw": "not a JSON",
    "text_corpus/wikitext-2_tokenized_valid.txt": "not a JSON",
    "text_corpus/wikitext-2_tokenized_test.txt": "not a JSON",
    "extras/easyedit_editing_data_README.md": "not a JSON",
}


@pytest.mark.parametrize("rel", sorted(DETECT))
def test_detect_format(data_dir, rel):
    assert detect_format(data_dir / rel) == DETECT[rel]


@pytest.mark.parametrize("rel", sorted(REJECT))
def test_detect_rejects(data_dir, rel):
    with pytest.raises(FormatError) as e:
        detect_format(data_dir / rel)
    assert REJECT[rel] in str(e.value) and rel.split("/")[-1] in str(e.value)
    with pytest.raises(FormatError):
        read_cases(data_dir / rel)


def test_wikibio_rejected_even_when_named(data_dir):
    with pytest.raises(FormatError) as e:
        read_cases(data_dir / "knowedit/WikiBio/wikibio-test-all.json", "knowedit")
    assert "'prompt'" in str(e.value) and "record 0 (0-based)" in str(e.value)


def test_readme_table_is_covered(data_dir):
    """Every data file on disk is in one of the two tables above (a new file gets a decision)."""
    on_disk = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()}
    # not edit data: PIQA's label file, and the published KnowEdit table that `bench knowedit` compares against
    on_disk -= {"README.md", "SHA256SUMS", "extras/piqa_locality/piqa_valid-labels.lst",
                "published/knowedit_published.json"}
    assert on_disk <= set(DETECT) | set(REJECT)


# --------------------------------------------------------------------------------------------- malformed input


def write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


CF = {"case_id": 7, "prompt": "The capital of France is", "target_new": "Rome", "subject": "France",
      "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "The capital of Spain is",
      "locality_ground_truth": "Madrid"}


def test_missing_file(tmp_path):
    with pytest.raises(FormatError) as e:
        read_cases(tmp_path / "nope.json")
    assert "nope.json" in str(e.value) and "no such file" in str(e.value)
    with pytest.raises(FormatError, match="not a regular file"):
        read_cases(tmp_path)


def test_bad_json_names_line_and_column(tmp_path):
    p = write(tmp_path, "bad.json", '[\n  {"prompt": "a",\n   "target_new": }\n]')
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert str(e.value).startswith(str(p)) and "line 3, column 18" in str(e.value)


def test_jsonl_bad_line(tmp_path):
    good = json.dumps(CF)
    p = write(tmp_path, "cases.jsonl", f"{good}\n\n{good}\n{{\"prompt\": \"x\", oops}}\n")
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert f"{p}, line 4" in str(e.value) and "invalid JSON" in str(e.value)
    assert e.value.line == 4 and e.value.path == str(p)
    # JSONL without the .jsonl suffix is recognised too, and field errors name the line
    bad = dict(CF, target_new=3)
    p = write(tmp_path, "cases.json", f"{good}\n{json.dumps(bad)}\n")
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert f"{p}, line 2, field 'target_new'" in str(e.value) and "expected a string, got number" in str(e.value)


def test_missing_prompt(tmp_path):
    recs = [CF, {k: v for k, v in CF.items() if k != "prompt"}]
    p = write(tmp_path, "cf.json", recs)
    with pytest.raises(FormatError) as e:
        read_cases(p, "counterfact_easyedit")
    assert str(e.value) == f"{p}, record 1 (0-based), field 'prompt': missing required field"
    assert (e.value.path, e.value.record, e.value.field) == (str(p), 1, "prompt")


def test_wrong_types(tmp_path):
    p = write(tmp_path, "cf.json", [CF, CF, dict(CF, target_new=["Rome"])])
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert "record 2 (0-based), field 'target_new'" in str(e.value) and "got array" in str(e.value)

    rome = {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Paris",
                                                "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
            "paraphrase_prompts": "Paris is located in"}
    p = write(tmp_path, "rome.json", [rome])
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert "field 'paraphrase_prompts'" in str(e.value) and "expected an array of strings" in str(e.value)

    rome["paraphrase_prompts"] = ["Paris is located in"]
    rome["requested_rewrite"]["target_new"] = "Italy"
    p = write(tmp_path, "rome.json", [rome])
    with pytest.raises(FormatError, match=r"record 0 \(0-based\), field 'requested_rewrite.target_new'"):
        read_cases(p)

    rome["requested_rewrite"]["target_new"] = {"str": "Italy"}
    rome["requested_rewrite"]["prompt"] = "Paris is in"
    p = write(tmp_path, "rome.json", [rome])
    with pytest.raises(FormatError, match=r"no '\{\}' for the subject"):
        read_cases(p)


def test_empty_target(tmp_path):
    p = write(tmp_path, "cf.json", [CF, dict(CF, target_new="  ")])
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert "record 1 (0-based), field 'target_new': empty string" in str(e.value)
    assert read_cases(p, skip_incomplete=True) == read_cases(write(tmp_path, "one.json", [CF]))


def test_record_not_an_object(tmp_path):
    p = write(tmp_path, "cf.json", [CF, "just a string"])
    with pytest.raises(FormatError, match=r"record 1 \(0-based\): expected a JSON object, got string"):
        read_cases(p)
    p = write(tmp_path, "cf.json", ["just a string"])
    with pytest.raises(FormatError, match="expected a JSON object"):
        detect_format(p)


def test_knowedit_bad_probe(tmp_path):
    rec = {"prompt": "The capital of France is", "target_new": "Rome", "subject": "France",
           "locality": {"Relation_Specificity": [{"prompt": "The currency of France is",
                                                  "ground_truth": [["euro", 5]]}]}}
    p = write(tmp_path, "ke.json", [rec])
    with pytest.raises(FormatError) as e:
        read_cases(p, "knowedit")
    assert "field 'locality.Relation_Specificity[0].ground_truth[0][1]'" in str(e.value)
    rec["locality"] = {"Relation_Specificity": {"prompt": "x"}}
    p = write(tmp_path, "ke.json", [rec])
    with pytest.raises(FormatError, match=r"field 'locality\.Relation_Specificity': expected an array"):
        read_cases(p)


def test_mquake_and_sanitation_errors(tmp_path):
    mq = {"case_id": 1, "requested_rewrite": [
        {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
        {"prompt": "{} is in", "subject": "Italy", "target_new": {"str": ""}, "target_true": {"str": "Europe"}}],
          "questions": ["Where is Paris?"], "new_answer": "Asia"}
    p = write(tmp_path, "mq.json", [mq])
    with pytest.raises(FormatError, match=r"record 0 \(0-based\), field 'requested_rewrite\[1\].target_new.str'"):
        read_cases(p)
    san = {"success": [{"question": "Q?", "target_new": "I don't know.", "ground_truth": "A"}],
           "locality": [{"question": "Q2?"}]}
    p = write(tmp_path, "san.json", san)
    with pytest.raises(FormatError) as e:
        read_cases(p)
    assert "record locality[0] (0-based), field 'ground_truth': missing required field" in str(e.value)


def test_unknown_format_and_undetectable(tmp_path):
    p = write(tmp_path, "x.json", [{"question": "Q", "answer": "A"}])
    with pytest.raises(FormatError, match="unknown format 'rome'"):
        read_cases(p, "rome")
    with pytest.raises(FormatError) as e:
        detect_format(p)
    msg = str(e.value)
    assert "x.json" in msg and "matches no known format" in msg and "['answer', 'question']" in msg
    assert all(name in msg for name in FORMATS)
    p = write(tmp_path, "empty.json", "[]")
    with pytest.raises(FormatError, match="no records"):
        read_cases(p)
    assert read_cases(p, "knowedit") == []
    with pytest.raises(FormatError, match=r"record 0 \(0-based\): expected a JSON object, got number"):
        read_cases(write(tmp_path, "n.json", "[1]"), "zsre")
    with pytest.raises(FormatError, match="not a JSON or JSON Lines file"):
        read_cases(write(tmp_path, "n.json", "5"))


def test_minimal_prompt_target_file_reads_as_knowedit(tmp_path):
    p = write(tmp_path, "mine.json", [{"prompt": "The capital of France is", "target_new": "Rome"}])
    assert read_cases(p) == [EditCase("The capital of France is", "Rome", case_id="0", source="knowedit")]


# ------------------------------------------------------------------------------------------- store JSONL export


def make_records() -> list[EditRecord]:
    t0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    t1 = datetime(2024, 5, 2, 8, 30, 15, 123456, tzinfo=UTC)
    case = EditCase("The capital of France is", "Rome", "France", "Paris", ("France's capital city is",),
                    (Probe("The capital of Spain is", "Madrid", "neighborhood"),),
                    (Probe("The capital of France's neighbour Italy is", "Rome", "one_hop", ("Roma",)),),
                    "cf/7", "counterfact_rome", {"relation_id": "P36", "tags": ["geo"]})
    return [
        EditRecord(1, 1, case.prompt, "Lyon", case.subject, case.ground_truth, case.rephrases,
                   case_to_metadata(case), False, t0, t1),
        EditRecord(1, 2, case.prompt, case.target_new, case.subject, case.ground_truth, case.rephrases,
                   case_to_metadata(case), False, t1, None),
        EditRecord(2, 1, "Water boils at\u2028sea level at", "90 degrees", None, None, (), {}, False, t0, t1),
        EditRecord(2, 2, "Water boils at\u2028sea level at", "90 degrees", None, None, (), {}, True, t1, None),
        EditRecord(3, 1, "Der Himmel ist", "grün", "Himmel", "blau", (), {"note": "ünïcödé"}, False, t0, None),
    ]


def test_round_trip(tmp_path):
    records = make_records()
    path = tmp_path / "export.jsonl"
    assert write_jsonl(iter(records), path) == 5
    assert detect_format(path) == "editmem"
    assert read_records(path) == records
    cs = read_cases(path, "editmem")
    assert [c.case_id for c in cs] == ["cf/7", "3"]  # current versions only; case_id defaults to the stored id
    c = cs[0]
    assert c == EditCase("The capital of France is", "Rome", "France", "Paris", ("France's capital city is",),
                         (Probe("The capital of Spain is", "Madrid", "neighborhood"),),
                         (Probe("The capital of France's neighbour Italy is", "Rome", "one_hop", ("Roma",)),),
                         "cf/7", "counterfact_rome", {"relation_id": "P36", "tags": ["geo"]})
    assert cs[1].metadata == {"note": "ünïcödé"} and cs[1].source == "editmem"
    assert case_from_record(records[1]) == c
    line = json.loads(path.read_text(encoding="utf-8").split("\n")[0])
    assert line == record_to_json(records[0])
    assert line["valid_from"] == "2024-05-01T12:00:00+00:00" and line["rephrases"] == ["France's capital city is"]
    assert read_cases(path) == cs  # auto-detected


def test_round_trip_real_cases(tmp_path, data_dir):
    """Dataset cases -> records -> export -> import gives the same cases back."""
    originals = [c for rel in ("knowedit/wiki_counterfact/test_cf.reconstructed.json", "mquake/MQuAKE-hard.json",
                               "counterfact/rome_format/counterfact_distracting_neighbor.json")
                 for c in cases(rel)[:20]]
    records = [EditRecord(i + 1, 1, c.prompt, c.target_new, c.subject, c.ground_truth, c.rephrases,
                          case_to_metadata(c)) for i, c in enumerate(originals)]
    write_jsonl(records, tmp_path / "x.jsonl")
    assert read_cases(tmp_path / "x.jsonl") == originals


def test_write_is_atomic(tmp_path):
    path = tmp_path / "export.jsonl"
    write_jsonl(make_records(), path)
    before = path.read_bytes()
    bad = EditRecord(9, 1, "p", "t", metadata={"when": datetime(2024, 1, 1)})
    with pytest.raises(FormatError) as e:
        write_jsonl([*make_records(), bad], path)
    assert "edit 9 version 1 cannot be written as JSON" in str(e.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["export.jsonl"]  # no temporary file left behind

    def failing():
        yield make_records()[0]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl(failing(), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FormatError, match="directory does not exist"):
        write_jsonl([], tmp_path / "missing" / "x.jsonl")
    write_jsonl([], tmp_path / "empty.jsonl")
    assert read_cases(tmp_path / "empty.jsonl", "editmem") == []


def test_editmem_validation(tmp_path):
    good = record_to_json(make_records()[4])
    cases_ = [
        (dict(good, id="3"), "field 'id': expected an integer, got string"),
        (dict(good, version=0), "field 'version': must be at least 1"),
        (dict(good, rephrases="x"), "field 'rephrases': expected an array of strings"),
        (dict(good, valid_from="yesterday"), "field 'valid_from': not an ISO 8601"),
        (dict(good, deleted="no"), "field 'deleted': expected true or false"),
        (dict(good, metadata={"locality": [{"prompt": "p"}]}), "field 'metadata.locality[0].answer'"),
        (dict(good, target_new=""), "field 'target_new': empty string"),
    ]
    for bad, message in cases_:
        bad = dict(bad, id=4) if bad["id"] == 3 else bad  # a different edit, so only the planted fault is wrong
        p = write(tmp_path, "e.jsonl", json.dumps(good) + "\n" + json.dumps(bad, ensure_ascii=False) + "\n")
        with pytest.raises(FormatError) as e:
            read_cases(p, "editmem")
        assert f"{p}, line 2, " in str(e.value) and message in str(e.value), str(e.value)
    p = write(tmp_path, "dup.jsonl", json.dumps(good) + "\n" + json.dumps(dict(good, version=2)) + "\n")
    with pytest.raises(FormatError, match="id 3 has two current versions"):
        read_records(p)
    p = write(tmp_path, "dup.jsonl", json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(FormatError, match="appears twice"):
        read_records(p)


def test_case_metadata_reserved_keys():
    with pytest.raises(ValidationError, match="reserved"):
        case_to_metadata(EditCase("p", "t", metadata={"locality": []}))
    record = EditRecord(1, 1, "p", "t", metadata={"portability": "oops"})
    with pytest.raises(ValidationError, match=r"metadata\.portability"):
        case_from_record(record)


def test_editcase_metadata_keeps_hashing():
    a = EditCase("p", "t", metadata={"x": 1})
    assert hash(a) == hash(EditCase("p", "t"))
    assert a != EditCase("p", "t") and a == EditCase("p", "t", metadata={"x": 1})

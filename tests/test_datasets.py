"""eval.datasets: load_cases is read_cases plus a limit, and re-exports the case types."""

from __future__ import annotations

import json

import pytest

import eval.datasets as ds
from memory.errors import FormatError, ValidationError
from memory.formats import read_cases
from memory.records import EditCase, Probe


def test_reexports():
    assert ds.EditCase is EditCase and ds.Probe is Probe
    assert "counterfact_easyedit" in ds.FORMATS


def test_load_cases_matches_read_cases(data_dir):
    path = data_dir / "counterfact/easyedit_split/counterfact-val.json"
    everything = ds.load_cases(path)
    assert len(everything) == 1919 and everything == read_cases(path)
    first = ds.load_cases(path, limit=5)
    assert first == everything[:5]
    assert first[0].case_id == everything[0].case_id
    assert ds.load_cases(path, "counterfact_easyedit", limit=0) == []
    assert ds.load_cases(path, limit=10**6) == everything


def test_limit_counts_edit_cases(data_dir):
    cs = ds.load_cases(data_dir / "mquake/MQuAKE-hard.json", limit=6)
    assert [c.case_id for c in cs] == ["7417/0", "7417/1", "7417/2", "7417/3", f"{cs[4].metadata['group']}/0",
                                       f"{cs[4].metadata['group']}/1"]


def test_bad_limit(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"prompt": "a", "target_new": "b"}]))
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValidationError, match="limit"):
            ds.load_cases(p, limit=bad)


def test_errors_and_options_pass_through(tmp_path, data_dir):
    with pytest.raises(FormatError, match="no such file"):
        ds.load_cases(tmp_path / "missing.json")
    with pytest.raises(FormatError, match="WikiBio"):
        ds.load_cases(data_dir / "knowedit/WikiBio/wikibio-test-all.json", limit=1)
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"prompt": "a", "target_new": ""}, {"prompt": "c", "target_new": "d"}]))
    with pytest.raises(FormatError, match=r"record 0 \(0-based\), field 'target_new'"):
        ds.load_cases(p, limit=1)  # the whole file is validated, not just the first `limit`
    assert [c.prompt for c in ds.load_cases(p, skip_incomplete=True)] == ["c"]

"""The harness end to end on the real SmolLM2-135M with `none` and `ft` on a few CounterFact cases."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytestmark = pytest.mark.integration

N_CASES = 3
# FT-L's published defaults (lr 5e-4, L-inf constraint 5e-4) barely move SmolLM2 in 25 steps; an unconstrained,
# larger step makes the edit take hold so the test can tell a working pipeline from a broken one.
FT_STRONG = {"lr": 5e-3, "steps": 15, "norm_constraint": None}


def test_smollm2_counterfact_none_and_ft(data_dir, tmp_path):
    from editors.lm.loading import load_model
    from eval.datasets import load_cases
    from eval.harness import run_eval

    path = data_dir / "counterfact" / "easyedit_split" / "counterfact-edit.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    cases = load_cases(path, limit=N_CASES)
    model, tok = load_model("smollm2-135m")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    start = time.perf_counter()
    summary = run_eval(model, tok, cases, ["none", "ft"], out_dir=tmp_path, model_name="smollm2-135m",
                       dataset_name=path.name, editor_overrides={"ft": FT_STRONG}, progress=False)
    seconds = time.perf_counter() - start

    none, ft = summary["methods"]["none"], summary["methods"]["ft"]
    assert none["locality"] == 1.0
    assert ft["reliability"] > none["reliability"]
    assert none["n"] == ft["n"] == N_CASES
    assert 0.0 <= ft["locality"] <= 1.0 and ft["fluency"] > 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len((tmp_path / "cases.jsonl").read_text().splitlines()) == 2 * N_CASES
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    print(f"\n{N_CASES} CounterFact cases, none + ft, teacher-forced: {seconds:.1f} s; "
          f"ft reliability {ft['reliability']:.2f}, locality {ft['locality']:.2f}, "
          f"edit {ft['edit_seconds']:.2f} s/edit")

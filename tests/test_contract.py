"""Every registered editor x every tiny architecture through the one shared tester (:mod:`tests.contract`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from editors.base import available_editors
from tests.contract import check_editor_contract
from tests.tiny import TINY_ARCHS, tiny_model

_LOCATE = dict(clamp_norm_factor=1000.0, v_weight_decay=0.0, n_prefixes=2, prefix_tokens=4, v_steps=10)


def _demo_pool(tmp_path: Path) -> dict[str, Any]:
    records = [{"case_id": i, "prompt": f"The capital of {c} is", "target_new": t, "subject": c,
                "ground_truth": "x", "rephrase_prompt": f"The capital city of {c} is",
                "locality_prompt": f"People in {c} speak", "locality_ground_truth": "French"}
               for i, (c, t) in enumerate([("Italy", "Paris"), ("Spain", "Tokyo"), ("Japan", "Madrid")])]
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return {"demos": str(path), "encoder": "hashing-256", "k": 1, "context": "new-fact-prompt"}


@functools.cache
def _mend_checkpoint(arch: str, folder: str) -> str:
    from editors.methods.mend import MENDTrainSettings, save_checkpoint, train_mend
    from memory.records import EditCase

    model, tok = tiny_model(arch)
    capitals = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                ("Japan", "Tokyo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Norway", "Oslo")]
    cases = [EditCase(f"The capital of {c} is", capitals[(i + 3) % len(capitals)][1], c, cap)
             for i, (c, cap) in enumerate(capitals)]
    cases += [EditCase("The capital of France is", "Rome", "France", "Paris"),
              EditCase("Marie Curie was born in", "Tokyo", "Marie Curie", "Warsaw")]
    quick = MENDTrainSettings(steps=30, val_every=10, batch_size=4, val_cases=2, rank=16, lr=1e-2, lr_edit_lr=5e-2)
    return str(save_checkpoint(train_mend(model, tok, cases, quick), model, Path(folder) / arch))


# What each editor needs on a tiny model; an editor without an entry runs with its defaults.
SETUPS: dict[str, Callable[[str, Path], dict[str, Any]]] = {
    "rome": lambda arch, tmp: dict(_LOCATE),
    "memit": lambda arch, tmp: {**_LOCATE, "mom2_update_weight": 1.0},
    # identity statistics: every direction is below the threshold, so P = I and l2 plays MEMIT's lambda
    "alphaedit": lambda arch, tmp: {**_LOCATE, "nullspace_threshold": 1e9, "l2": 1.0},
    "grace": lambda arch, tmp: {"v_steps": 10, "clamp_norm_factor": 1000.0},
    "serac": lambda arch, tmp: {"scope": "cosine", "encoder": "hashing-256", "threshold": 0.8},
    "hybrid": lambda arch, tmp: {"memory_settings": {"scope": "cosine", "encoder": "hashing-256", "threshold": 0.8},
                                 "weight_settings": {**_LOCATE, "mom2_update_weight": 1.0}},
    "ike": lambda arch, tmp: _demo_pool(tmp),
    "mend": lambda arch, tmp: {"checkpoint": _mend_checkpoint(arch, str(tmp.parent.parent / "mend-contract"))},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITMEM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDITMEM_STATS_CORPUS", raising=False)


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("name", available_editors())
def test_editor_contract(name, arch, tmp_path):
    model, tok = tiny_model(arch)
    overrides = SETUPS[name](arch, tmp_path) if name in SETUPS else {}
    check_editor_contract(name, model, tok, tmp_path, overrides)

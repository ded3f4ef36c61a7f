"""KN on SmolLM2: how locality and edit success move with the update scale and the number of neurons.

One integrated-gradients attribution per case (memoised, so the variants reuse it), then each variant's deltas are
applied, the case measured teacher-forced (eval.metrics.measure_case, as the bench does) and the model restored.

    OMP_NUM_THREADS=1 python notes/scripts/kn_settings.py --task ZsRE --limit 3

Variant names: n{max_neurons}_s{update and erase scale}_from{first layer attributed}.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time

import torch

import editors.methods.kn as kn
from editors.base import WeightEditHandle, get_editor
from editors.lm.architectures import num_layers
from editors.lm.loading import load_model
from eval.knowedit.tasks import load_task
from eval.metrics import TEACHER_FORCED, MetricSettings, measure_case

VARIANTS = [  # (max_neurons, scale of update and erase, first layer attributed; SmolLM2 has 30)
    (32, 1.0, 0), (32, 0.25, 0), (32, 0.05, 0), (4, 1.0, 0), (4, 0.25, 0), (1, 1.0, 0), (32, 1.0, 1), (32, 0.25, 1),
    (32, 1.0, 10)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="ZsRE")
    p.add_argument("--limit", type=int, default=3)
    p.add_argument("--data", default="../shared/data/knowedit")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    original = kn.neuron_attributions
    memo = functools.lru_cache(maxsize=None)(
        lambda m, ids, answer, layer, steps: original(m, list(ids), answer, layer, steps))
    kn.neuron_attributions = lambda m, ids, a, layer, steps: memo(m, tuple(ids), a, layer, steps)  # type: ignore
    settings = MetricSettings(fluency_tokens=50)
    rows: dict[str, list[dict]] = {f"n{n}_s{s}_from{lo}": [] for n, s, lo in VARIANTS}
    for case in load_task(args.task, args.data, args.limit):
        pre = measure_case(model, tok, case, [TEACHER_FORCED], settings=settings)
        for n, s, lo in VARIANTS:
            t0 = time.perf_counter()
            editor = get_editor("kn", model, tok, max_neurons=n, update_scale=s, erase_scale=s,
                                layers=tuple(range(lo, num_layers(model))))
            deltas = editor.compute([case.request()])
            layers = sorted({int(m.group(1)) for k in deltas if (m := re.search(r"layers\.(\d+)\.", k))})
            handle = WeightEditHandle.add_deltas(model, deltas)
            try:
                post = measure_case(model, tok, case, [TEACHER_FORCED], reference=pre.reference, settings=settings)
            finally:
                handle.restore()
            v = post.values[TEACHER_FORCED]
            rows[f"n{n}_s{s}_from{lo}"].append({"edit_succ": v["reliability"], "locality": v["locality"],
                                       "fluency": v["fluency"], "layers": layers,
                                       "seconds": round(time.perf_counter() - t0, 1)})
            name = f"n{n}_s{s}_from{lo}"
            print(json.dumps({"case": case.case_id, "variant": name, **rows[name][-1]}), flush=True)
    print("variant | edit_succ % | locality % | fluency x100 | layers")
    for name, rs in rows.items():
        def mean(k: str, rs: list[dict] = rs) -> float:
            vals = [r[k] for r in rs if r[k] is not None]
            return sum(vals) / len(vals) if vals else float("nan")
        print(f"{name} | {100 * mean('edit_succ'):.1f} | {100 * mean('locality'):.1f} | {100 * mean('fluency'):.0f} | "
              f"{sorted({x for r in rs for x in r['layers']})}")


if __name__ == "__main__":
    main()

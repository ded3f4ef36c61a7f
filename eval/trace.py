"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", section 2.1): where in the
model a fact is recalled.

1. **Clean run**: the prompt's answer is the model's top next token (or the first token of a given ``answer``); its
   probability is ``p_clean``, and every block's output (the hidden state), every MLP's output and every attention
   output (the attention output projection's output) is recorded at every token.
2. **Corrupted run**: Gaussian noise of standard deviation ``noise`` x the standard deviation of the input
   embedding matrix (ROME: 3x the std of subject embeddings) is added to the embeddings of the subject's tokens;
   ``samples`` noise draws (a seeded local generator) are averaged. ``p_corrupt`` is the answer's probability then.
3. **Restoration**: for each kind (``hidden``, ``mlp``, ``attn``), each layer and each token, the corrupted run is
   repeated with that one state put back to its clean value; the answer's probability (mean over the noise draws)
   goes in a (tokens x layers) grid. A high value where little else recovers it marks where the fact is carried.

:func:`causal_trace` returns a :class:`Trace` (JSON-able with :meth:`Trace.to_json`); :func:`plot_trace` draws the
three heatmaps; :func:`average_traces` averages traces of many facts over ROME's six token groups (first, middle
and last subject token, first token after the subject, further tokens, last token).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from editors.lm.architectures import Which, arch_spec, get_module, layer_module, num_layers
from editors.lm.tokens import encode_prompt, encode_prompt_target
from memory.errors import ValidationError

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
_MODULE: dict[str, Which] = {"hidden": "block", "mlp": "mlp", "attn": "attn_out"}
GROUPS: tuple[str, ...] = ("first subject token", "middle subject tokens", "last subject token",
                           "first subsequent token", "further tokens", "last token")


@dataclass
class Trace:
    """One causal trace: ``scores[kind][t][l]`` is the answer's probability with state (kind, layer l, token t)
    restored, averaged over the noise draws."""

    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_range: tuple[int, int]  # [start, end) token positions of the subject
    p_clean: float
    p_corrupt: float
    scores: dict[str, list[list[float]]]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def subject_range(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """``[start, end)`` of the subject's tokens in :func:`encode_prompt` ``(tokenizer, prompt)`` (leading specials
    counted), from the fast tokenizer's character offsets."""
    at = prompt.find(subject) if subject else -1
    if at < 0:
        raise ValidationError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = at + len(subject)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    lead = len(encode_prompt(tokenizer, prompt)) - len(enc["input_ids"])
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > at and b > a]
    if not inside:
        raise ValidationError(f"subject {subject!r} covers no token of {prompt!r}")
    return lead + inside[0], lead + inside[-1] + 1


def _first(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else value[0]


def _with_first(value: Any, new: torch.Tensor) -> Any:
    return new if isinstance(value, torch.Tensor) else (new, *value[1:])


@contextmanager
def _hook(module: torch.nn.Module, fn: Any) -> Iterator[None]:
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def _module(model: torch.nn.Module, kind: str, layer: int) -> torch.nn.Module:
    return layer_module(model, layer, _MODULE[kind])


class _Tracer:
    def __init__(self, model: torch.nn.Module, ids: list[int], span: tuple[int, int], answer_id: int,
                 noise: float, samples: int, seed: int):
        self.model, self.ids, self.span, self.answer_id, self.samples = model, ids, span, answer_id, samples
        self.device = next(model.parameters()).device
        self.embed = get_module(model, arch_spec(model).embeddings)
        table = torch.as_tensor(self.embed.weight)
        std = float(table.detach().float().std())
        gen = torch.Generator().manual_seed(seed)
        width = int(table.shape[1])
        self.noise = (noise * std * torch.randn(samples, span[1] - span[0], width, generator=gen)).to(self.device)
        self.layers = num_layers(model)
        self.clean: dict[tuple[str, int], torch.Tensor] = {}

    def _prob(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1].float().softmax(-1)[:, self.answer_id]

    def clean_run(self) -> float:
        with ExitStack() as stack:
            for kind in KINDS:
                for layer in range(self.layers):
                    def keep(_m: Any, _a: Any, out: Any, key: tuple[str, int] = (kind, layer)) -> None:
                        self.clean[key] = _first(out).detach()[0]
                    stack.enter_context(_hook(_module(self.model, kind, layer), keep))
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([self.ids], device=self.device), use_cache=False).logits
        return float(self._prob(logits)[0])

    def corrupted(self, restore: Mapping[tuple[str, int], Sequence[int]] | None = None, rows: int = 1
                  ) -> torch.Tensor:
        """Answer probability per row block (``rows`` blocks of ``samples`` rows each, mean over the draws), with
        ``restore[(kind, layer)][b]`` the token restored in row block ``b`` (-1: none)."""
        n = rows * self.samples
        a, b = self.span

        def add_noise(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, a:b] += self.noise.repeat(rows, 1, 1).to(out.dtype)
            return out

        with ExitStack() as stack:
            stack.enter_context(_hook(self.embed, add_noise))
            for key, tokens in (restore or {}).items():
                def put_back(_m: Any, _a: Any, out: Any, key: tuple[str, int] = key,
                             tokens: Sequence[int] = tokens) -> Any:
                    hidden = _first(out).clone()
                    for block, t in enumerate(tokens):
                        if t >= 0:
                            hidden[block * self.samples:(block + 1) * self.samples, t] = self.clean[key][t]
                    return _with_first(out, hidden)
                stack.enter_context(_hook(_module(self.model, *key), put_back))
            with torch.no_grad():
                ids = torch.tensor([self.ids], device=self.device).expand(n, -1)
                probs = self._prob(self.model(input_ids=ids, use_cache=False).logits)
        return probs.view(rows, self.samples).mean(-1)


def causal_trace(model: torch.nn.Module, tokenizer: Any, prompt: str, subject: str, *, answer: str | None = None,
                 noise: float = 3.0, samples: int = 10, seed: int = 0,
                 kinds: Sequence[str] = KINDS) -> Trace:
    """Trace ``prompt`` with ``subject`` corrupted (see the module docstring)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValidationError(f"unknown trace kind(s) {unknown}; choose from {list(KINDS)}")
    ids = encode_prompt(tokenizer, prompt)
    span = subject_range(tokenizer, prompt, subject)
    device = next(model.parameters()).device
    if answer is None:
        with torch.no_grad():
            answer_id = int(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].argmax())
    else:
        full, start = encode_prompt_target(tokenizer, prompt, answer)
        answer_id = full[start]
    tracer = _Tracer(model, ids, span, answer_id, noise, samples, seed)
    p_clean = tracer.clean_run()
    p_corrupt = float(tracer.corrupted()[0])
    n = len(ids)
    scores: dict[str, list[list[float]]] = {}
    for kind in kinds:
        columns = [tracer.corrupted({(kind, layer): list(range(n))}, rows=n).tolist() for layer in range(tracer.layers)]
        scores[kind] = [[columns[layer][t] for layer in range(tracer.layers)] for t in range(n)]
    return Trace(prompt, subject, tokenizer.decode([answer_id]), [tokenizer.decode([i]) for i in ids], span,
                 p_clean, p_corrupt, scores)


def restore_all(model: torch.nn.Module, tokenizer: Any, prompt: str, subject: str, layer: int, *,
                noise: float = 3.0, samples: int = 4, seed: int = 0) -> tuple[float, float]:
    """``(p_clean, p)`` where ``p`` is the corrupted run with the hidden state of ``layer`` restored at every token
    at once: equal to ``p_clean`` (everything after that layer sees clean inputs). A check of the machinery."""
    ids = encode_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    with torch.no_grad():
        answer_id = int(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].argmax())
    tracer = _Tracer(model, ids, subject_range(tokenizer, prompt, subject), answer_id, noise, samples, seed)
    p_clean = tracer.clean_run()
    key = ("hidden", layer)
    with ExitStack() as stack:
        a, b = tracer.span

        def add_noise(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[:, a:b] += tracer.noise.to(out.dtype)
            return out

        def put_back(_m: Any, _a: Any, out: Any) -> Any:
            return _with_first(out, tracer.clean[key].unsqueeze(0).expand_as(_first(out)).clone())

        stack.enter_context(_hook(tracer.embed, add_noise))
        stack.enter_context(_hook(_module(model, *key), put_back))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids], device=device).expand(samples, -1), use_cache=False).logits
    return p_clean, float(tracer._prob(logits).mean())


def token_groups(trace: Trace) -> list[int]:
    """ROME's six token groups (indices into :data:`GROUPS`) of each token of ``trace``."""
    a, b = trace.subject_range
    n = len(trace.tokens)
    groups = []
    for t in range(n):
        if t == n - 1:
            groups.append(5)
        elif t == a:
            groups.append(0)
        elif a < t < b - 1:
            groups.append(1)
        elif t == b - 1:
            groups.append(2)
        elif t == b:
            groups.append(3)
        else:
            groups.append(4)
    return groups


def average_traces(traces: Sequence[Trace]) -> dict[str, Any]:
    """Mean restored probability per kind, token group and layer over ``traces`` (groups absent in a trace are
    left out of its mean), with the mean clean and corrupted probabilities."""
    if not traces:
        raise ValidationError("no traces to average")
    kinds = list(traces[0].scores)
    layers = len(next(iter(traces[0].scores.values()))[0])
    out: dict[str, Any] = {"n": len(traces), "groups": list(GROUPS),
                           "p_clean": sum(t.p_clean for t in traces) / len(traces),
                           "p_corrupt": sum(t.p_corrupt for t in traces) / len(traces), "scores": {}}
    for kind in kinds:
        grid = []
        for g in range(len(GROUPS)):
            rows = [tr.scores[kind][t] for tr in traces for t, gg in enumerate(token_groups(tr)) if gg == g]
            grid.append([sum(r[la] for r in rows) / len(rows) if rows else float("nan") for la in range(layers)])
        out["scores"][kind] = grid
    return out


def plot_trace(scores: Mapping[str, Sequence[Sequence[float]]], labels: Sequence[str], title: str,
               out_dir: str | Path, stem: str = "trace") -> list[Path]:
    """One heatmap PNG per kind (``{stem}_{kind}.png``), tokens (or groups) down, layers across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    names = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
    for kind, grid in scores.items():
        fig, ax = plt.subplots(figsize=(0.25 * len(grid[0]) + 3, 0.3 * len(grid) + 1.5))
        im = ax.imshow(grid, cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind], aspect="auto")
        ax.set_yticks(range(len(labels)), list(labels), fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(f"{title}: restoring the {names[kind]}", fontsize=8)
        fig.colorbar(im, ax=ax, label="p(answer)")
        fig.tight_layout()
        path = out / f"{stem}_{kind}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def trace_cases(model: torch.nn.Module, tokenizer: Any, path: str | Path, n: int, *, noise: float = 3.0,
                samples: int = 10, seed: int = 0, progress: bool = True) -> tuple[list[Trace], dict[str, Any]]:
    """Trace the first ``n`` facts of a JSON file of ``{prompt, subject[, attribute]}`` records (ROME's
    ``known_1000.json``; records whose subject is not in the prompt are skipped) and average them over token
    groups; returns ``(traces, average)``. The answer traced is the model's own top token, as in ROME."""
    import json

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValidationError(f"{path}: expected a JSON array of {{prompt, subject}} records")
    from tqdm import tqdm

    traces: list[Trace] = []
    with tqdm(total=n, desc="causal trace", unit="fact", disable=not progress) as bar:
        for r in records:
            if len(traces) >= n:
                break
            if isinstance(r, dict) and isinstance(r.get("prompt"), str) and r.get("subject") in r["prompt"]:
                traces.append(causal_trace(model, tokenizer, r["prompt"], r["subject"], noise=noise,
                                           samples=samples, seed=seed))
                bar.update(1)
    return traces, average_traces(traces)


def write_trace(trace: Trace, out_dir: str | Path) -> list[Path]:
    """``trace.json`` and the three heatmaps of one trace in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trace.json").write_text(json.dumps(trace.to_json(), indent=1), encoding="utf-8")
    a, b = trace.subject_range
    labels = [f"{tok}*" if a <= i < b else tok for i, tok in enumerate(trace.tokens)]
    return [out / "trace.json", *plot_trace(trace.scores, labels, f"p({trace.answer!r})", out)]


def write_average(average: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``average.json`` and the three averaged heatmaps (token groups down, layers across) in ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "average.json").write_text(json.dumps(average, indent=1), encoding="utf-8")
    return [out / "average.json",
            *plot_trace(average["scores"], GROUPS, f"mean of {average['n']} facts", out, stem="average")]

"""`editmem trace`: ROME's causal tracing of one prompt (or the average over a file's facts); the logic is in
:mod:`eval.trace`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="causal tracing: where a fact is recalled (hidden / MLP / attention heatmaps)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("--prompt", help="the prompt, e.g. 'The Eiffel Tower is located in the city of'")
    p.add_argument("--subject", help="the subject in the prompt, whose embeddings are corrupted")
    p.add_argument("--answer", default=None, help="the answer to trace (default: the model's top next token)")
    p.add_argument("--data", type=Path, default=None,
                   help="instead of --prompt: average over the first --n facts of this file (ROME known_1000.json)")
    p.add_argument("--n", type=int, default=20, help="facts to average with --data (default: %(default)s)")
    p.add_argument("--samples", type=int, default=10, help="noise draws (default: %(default)s)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std in embedding stds (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("trace_out"), help="output folder (default: %(default)s)")
    p.set_defaults(func=run_trace)


def run_trace(args: argparse.Namespace) -> int:
    from editors.lm.loading import load_model
    from eval.trace import causal_trace, trace_cases, write_average, write_trace
    from memory.errors import ValidationError

    if args.data is None and not (args.prompt and args.subject):
        raise ValidationError("give --prompt and --subject, or --data FILE")
    model, tokenizer = load_model(args.model)
    if args.data is not None:
        _, average = trace_cases(model, tokenizer, args.data, args.n, noise=args.noise, samples=args.samples)
        paths = write_average(average, args.out)
        print(f"{average['n']} facts: mean p_clean {average['p_clean']:.3f}, p_corrupt {average['p_corrupt']:.3f}")
    else:
        trace = causal_trace(model, tokenizer, args.prompt, args.subject, answer=args.answer, noise=args.noise,
                             samples=args.samples)
        paths = write_trace(trace, args.out)
        print(f"answer {trace.answer!r}: p_clean {trace.p_clean:.3f}, p_corrupt {trace.p_corrupt:.3f}")
    for path in paths:
        print(path)
    return 0

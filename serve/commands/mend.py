"""`editmem train-mend`: train a MEND hypernetwork for one model and save it as a named checkpoint.

    editmem train-mend --model smollm2-135m --data FILE [--format auto] [--limit N] [--val-data FILE]
                       [--steps N] [--batch-size B] [--time-limit SECONDS] [--set KEY=VALUE ...] --out NAME|DIR

``--out NAME`` saves under ``$EDITMEM_CACHE/mend/NAME`` (a value with a path separator is a folder); edit with it via
``editmem eval --methods mend --set mend.checkpoint=NAME``. The folder gets ``mend.pt``, ``config.json``,
``history.json`` and ``validation.png`` (the validation curve). torch is imported inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memory.errors import ValidationError
from serve.options import check_output_folder, key_values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-mend", help="train a MEND gradient hypernetwork for a model",
                       description="Train MEND (Mitchell et al. 2022) on zsRE- or CounterFact-format edits and save "
                                   "the hypernetwork as a checkpoint for `--methods mend --set mend.checkpoint=NAME`.")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("--data", required=True, help="training data (zsRE or CounterFact format, or any eval format)")
    p.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases of --data")
    p.add_argument("--val-data", default=None,
                   help="validation data (default: the last val_cases usable cases of --data, held out)")
    p.add_argument("--steps", type=int, default=None, help="most optimisation steps (default: the setting's)")
    p.add_argument("--batch-size", type=int, default=None, help="edits per step (default: the setting's)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after this much training time (a final validation is still run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting, e.g. c_loc=2 or layers=[27,28,29] (value parsed as JSON, else a "
                        "string); repeatable")
    p.add_argument("--out", required=True, help="checkpoint name (under $EDITMEM_CACHE/mend/) or folder")
    p.set_defaults(func=run_train_mend)


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation curve: edit / rephrase accuracy and locality (share of unchanged predictions) against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in (("edit_acc", "edit accuracy"), ("rephrase_acc", "rephrase accuracy"),
                       ("loc_same", "locality (unchanged tokens)")):
        ax.plot(steps, [h[key] for h in history], marker="o", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation (teacher-forced token accuracy)")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["loss"] for h in history], color="grey", linestyle="--", label="validation loss")
    ax2.set_ylabel("validation loss")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_train_mend(args: argparse.Namespace) -> int:
    overrides = key_values(args.overrides, example="c_loc=2")
    for flag, key in ((args.steps, "steps"), (args.batch_size, "batch_size"), (args.time_limit, "time_limit_s")):
        if flag is not None:
            overrides[key] = flag
    if args.limit is not None and args.limit < 1:
        raise ValidationError(f"--limit must be >= 1, got {args.limit}")

    from editors.lm.loading import load_model
    from editors.methods.mend import (
        MENDTrainSettings,
        checkpoint_folder,
        save_checkpoint,
        train_mend,
    )
    from eval.datasets import load_cases

    settings = MENDTrainSettings.from_overrides(overrides)
    folder = checkpoint_folder(args.out)
    check_output_folder(folder, "--out")
    cases = load_cases(args.data, format=args.format, limit=args.limit, skip_incomplete=True)
    val_cases = load_cases(args.val_data, skip_incomplete=True) if args.val_data else None
    model, tokenizer = load_model(args.model)
    result = train_mend(model, tokenizer, cases, settings, val_cases=val_cases, progress=True)
    folder = save_checkpoint(result, model, folder)
    plot_history(result.history, folder / "validation.png",
                 f"MEND on {args.model}, {Path(args.data).name}: layers {list(result.layers)}")
    b = result.best
    print(f"trained MEND for {args.model} on {result.n_train} edits ({result.n_val} held out): {result.steps} steps "
          f"in {result.seconds:.0f} s ({result.stopped}); layers {list(result.layers)}")
    print(f"best validation (step {b['step']}): edit accuracy {b['edit_acc']:.3f}, rephrase accuracy "
          f"{b['rephrase_acc']:.3f}, locality {b['loc_same']:.3f}, locality KL {b['loc_kl']:.4f}, loss {b['loss']:.3f}")
    print(f"saved to {folder}; edit with --methods mend --set mend.checkpoint={args.out}")
    return 0

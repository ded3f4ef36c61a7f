"""Memory-editing commands: train a scope classifier, ask through the memory, measure routing and overhead.

    editmem train-scope --data FILE [--name default] [--target-precision 0.98] [--encoder all-MiniLM-L6-v2]
                        [--from-store] [--limit N] [--epochs E] [--hidden H]
    editmem ask "question" [--method serac|ike] [--model smollm2-135m] [-k 5] [--scope default] [--max-new-tokens 32]
                [--mode classic|gated] [--demos N] [--demo-file FILE]                       (the last three: ike)
    editmem train-counterfactual --data FILE [--name default] [--model smollm2-135m] [--steps N] [--train-layers L]
    editmem train-chat-adapter --data FILE [--data FILE ...] [--name default] [--limit N] [--steps N] [--rank R]
    editmem train-rerank --data FILE --out FOLDER [--scope default] [--skip N] [--limit N] [--max-pairs N] [--epochs E]
                         [--base FOLDER]                          (the cross-encoder reranker, a LoRA adapter)
    editmem train-relation-rerank --data FILE --out FILE.npz [--scope NAME] [--skip N] [--limit N] [--power P]
                                                                  (the relation reranker, a linear relation classifier)
    editmem eval-scope --data FILE [--scope default] [--limit N] [-k 5] [--reranker FILE] [--cross FOLDER] [--sweep]
                                                                            (routing precision/recall at scale)
    editmem bench-overhead [--model smollm2-135m] [--scope default] [--new-tokens 16] [--repeats 5]

torch, transformers and the encoder are imported inside the handlers, so ``editmem --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from memory.encoder import DEFAULT_ENCODER
from memory.errors import ValidationError
from scope.rerank import DEFAULT_RERANKER
from serve.options import check_output_folder, none_or_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-scope", help="train and calibrate a scope classifier from edit data or the store",
                       description="Train the scope head (and calibrate the cosine baseline) on pairs mined from "
                                   "edit cases; save it under $EDITMEM_CACHE/scope/NAME/vN.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="data file with rephrases and locality prompts (e.g. counterfact-train.json)")
    src.add_argument("--from-store", action="store_true", help="train on the edits in --store (their rephrases "
                                                               "and locality probes in metadata)")
    p.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    p.add_argument("--name", default="default", help="name to save under (default: %(default)s)")
    p.add_argument("--target-precision", type=float, default=0.98, help="held-out precision the threshold is "
                                                                          "chosen for (default: %(default)s)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="encoder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases")
    p.add_argument("--epochs", type=int, default=None, help="training epochs")
    p.add_argument("--hidden", type=int, default=None, help="hidden units of the head (0: logistic regression)")
    p.add_argument("--save-cosine", action="store_true", help="also save the calibrated cosine baseline as "
                                                              "NAME-cosine")
    p.set_defaults(func=_train_scope)

    p = sub.add_parser("ask", help="answer a question through the edit memory and say which edit shaped it")
    p.add_argument("question")
    p.add_argument("--method", default="serac", choices=["serac", "ike"], help="memory method (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="model alias or local folder (default: %(default)s)")
    p.add_argument("-k", type=int, default=5, help="candidates retrieved (default: %(default)s)")
    p.add_argument("--scope", default="default", help="scope classifier name or 'cosine' (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, help="override the classifier's threshold")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--counterfactual", default=None, help="serac: a trained counterfactual model or chat adapter "
                                                          "(name or folder; default: the one named 'default', else "
                                                          "the adapter shipped for SmolLM2, else the base model)")
    p.add_argument("--mode", default=None, choices=["classic", "gated"],
                   help="ike: the nearest edit always in context (classic) or only when in scope (gated) "
                        "(default: ike's, classic)")
    p.add_argument("--demos", type=int, default=None, help="ike: demonstrations in the prompt (default: ike's k)")
    p.add_argument("--demo-file", default=None, help="ike: demonstration pool file (default: counterfact-train.json "
                                                     "in $EDITMEM_DATA or ../shared/data)")
    p.set_defaults(func=_ask)

    p = sub.add_parser("train-counterfactual", help="fine-tune a copy of the model to answer from an edit in its "
                                                    "context (SERAC's counterfactual model)",
                       description="Fine-tune the top blocks of a copy of the model on edit cases (edit prompt, "
                                   "rephrases, locality prompts, each with the edit in context); save it under "
                                   "$EDITMEM_CACHE/counterfactual/NAME. Use it with `--set serac.counterfactual=NAME`.")
    p.add_argument("--data", required=True, help="edit cases with rephrases (e.g. counterfact-train.json)")
    p.add_argument("--format", default="auto")
    p.add_argument("--name", default="default", help="name to save under (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="base model alias or local folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases")
    for flag, kind, helptext in (("--steps", int, "optimizer steps"), ("--batch-size", int, "examples per step"),
                                 ("--train-layers", int, "top blocks fine-tuned"),
                                 ("--lr", float, "peak learning rate"),
                                 ("--val-cases", int, "held-out cases (the last ones)"),
                                 ("--val-every", int, "steps between validations"),
                                 ("--context", str, "context format the copy learns")):
        p.add_argument(flag, type=kind, default=None,
                       help=f"{helptext} (default: see editors.retrieval.counterfactual)")
    p.set_defaults(func=_train_counterfactual)

    p = sub.add_parser("train-chat-adapter", help="train a LoRA adapter that makes a chat model answer from an edit "
                                                  "in its conversation (SERAC's counterfactual model, chat rows)",
                       description="Train a LoRA adapter (peft) on edit cases put in the chat conversation the "
                                   "memory wrapper builds (edit prompt, rephrases, locality prompts; replies as the "
                                   "generation protocol reads them) and save it under "
                                   "$EDITMEM_CACHE/counterfactual/NAME (or a folder). SERAC uses the one named "
                                   "`default`, else the adapter shipped for SmolLM2-135M-Instruct; "
                                   "`--set serac.counterfactual=NAME` picks another.")
    p.add_argument("--data", required=True, action="append", help="edit cases with rephrases (repeatable: e.g. "
                                                                  "counterfact-train.json and zsre_mend_train-1k.json)")
    p.add_argument("--name", default="default", help="name or folder to save under (default: %(default)s)")
    p.add_argument("--model", default="smollm2-135m", help="base model alias or local folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N cases of each file")
    for flag, kind, helptext in (("--steps", int, "optimizer steps"), ("--batch-size", int, "examples per step"),
                                 ("--rank", int, "LoRA rank"), ("--layers", int, "top blocks adapted"),
                                 ("--lr", float, "peak learning rate"),
                                 ("--val-cases", int, "held-out cases"),
                                 ("--val-every", int, "steps between validations")):
        p.add_argument(flag, type=kind, default=None,
                       help=f"{helptext} (default: see editors.retrieval.chat_adapter)")
    p.set_defaults(func=_train_chat_adapter)

    p = sub.add_parser("train-rerank", help="train the cross-encoder reranker (a LoRA adapter over MiniLM) and "
                                            "calibrate it behind a scope head",
                       description="Mine (query, edit prompt) pairs from edit cases (rephrase and prompt -> own edit; "
                                   "neighbourhood prompts, bi-encoder neighbours and same-subject prompts of another "
                                   "relation -> negatives), train a LoRA adapter and a 1-logit head on a "
                                   "sentence-transformers CrossEncoder over the installed MiniLM, and calibrate its "
                                   "threshold on held-out queries gated by the scope head --scope. Route with it "
                                   "through `editmem eval-scope --cross FOLDER`.")
    p.add_argument("--data", required=True, help="edit cases with rephrases and locality prompts "
                                                 "(e.g. counterfact-train.json)")
    p.add_argument("--format", default="auto")
    p.add_argument("--out", required=True, help="folder to save the reranker in (new or empty)")
    p.add_argument("--scope", default="default", help="trained scope head that gates the candidates during "
                                                      "calibration (default: %(default)s)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="the store's encoder, for mining (default: %(default)s)")
    p.add_argument("--base", default=None, help="local BERT folder (default: the installed all-MiniLM-L6-v2)")
    p.add_argument("--relations", default=None, metavar="DIR",
                   help="ROME-format CounterFact folder with relation ids (default: beside the data's folder)")
    p.add_argument("--recalibrate", default=None, metavar="FOLDER",
                   help="do not train: choose the threshold of this trained reranker again (behind --scope, with "
                        "--margin / --target-precision if given) on the held-out cases of the same --data, --skip "
                        "and --limit it was trained with, and save it to --out")
    p.add_argument("--skip", type=int, default=0, help="skip the first N cases (e.g. those the head was trained on)")
    p.add_argument("--limit", type=int, default=None, help="then use only N cases")
    for flag, kind, helptext in (("--max-pairs", int, "training pairs (0: all mined)"), ("--epochs", int, "epochs"),
                                 ("--batch-size", int, "pairs per step"), ("--lr", float, "peak learning rate"),
                                 ("--rank", int, "LoRA rank"), ("--val-pairs", int, "held-out pairs validated"),
                                 ("--val-every", int, "steps between validations"),
                                 ("--margin", float, "reranks the best candidate this far below the scope threshold"),
                                 ("--target-precision", float, "held-out precision the threshold is chosen for"),
                                 ("--seed", int, "seed")):
        p.add_argument(flag, type=kind, default=None, help=f"{helptext} (default: see scope.cross_rerank)")
    p.set_defaults(func=_train_rerank)

    p = sub.add_parser("train-relation-rerank", help="train the relation reranker (which relation a prompt asks) "
                                                     "from cases with relation ids, to a .npz file",
                       description="Train scope.rerank.RelationReranker on every prompt, rephrase and locality prompt "
                                   "of the cases, labelled with its case's relation; route with it through "
                                   "eval-scope --reranker FILE or SERAC's setting --set serac.reranker=FILE.")
    p.add_argument("--data", required=True, help="edit cases (CounterFact: relation ids from rome_format beside it)")
    p.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .npz file to write (must not exist)")
    p.add_argument("--skip", type=int, default=0, help="leave out the first N cases (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use at most N cases after --skip")
    p.add_argument("--relations", default=None, metavar="DIR",
                   help="folder of ROME-format CounterFact files giving relation ids (default: "
                        "counterfact/rome_format beside the data file's folder, when it exists)")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="the store's encoder (default: %(default)s)")
    p.add_argument("--scope", default=None, metavar="NAME",
                   help="also calibrate this scope head's threshold behind the reranker, on the head's own held-out "
                        "cases (--data must be the file the head was trained on); SERAC then routes with it")
    p.add_argument("--in-store", action="store_true",
                   help="with --scope, choose that threshold on routings instead of pairs: every case of --data "
                        "stored, the head's held-out cases routed, the best recall at relation-aware precision "
                        ">= 0.99 without / 0.95 with a named edited subject (needs relation ids)")
    p.add_argument("--power", type=float, default=None, help="score * agreement ** power (default: see scope.rerank)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: see scope.rerank)")
    p.set_defaults(func=_train_relation_rerank)

    p = sub.add_parser("eval-scope", help="routing precision/recall with every case of a file in one store")
    p.add_argument("--data", required=True)
    p.add_argument("--format", default="auto")
    p.add_argument("--scope", default="default", help="scope classifier name or 'cosine' (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", dest="json_out", default=None, help="also write the report to this file")
    p.add_argument("--relations", default=None, metavar="DIR",
                   help="folder of ROME-format CounterFact files giving relation ids, for relation-aware labels "
                        "(default: counterfact/rome_format beside the data file's folder, when it exists)")
    p.add_argument("--reranker", default=DEFAULT_RERANKER, type=none_or_text, metavar="FILE",
                   help="a relation reranker (.npz) to route with; 'default' (the default) is the one shipped with "
                        "editmem, used behind the shipped scope head only (as SERAC); 'none' routes without one")
    p.add_argument("--cross", default=None, metavar="FOLDER",
                   help="a cross-encoder reranker (editmem train-rerank) over the gated candidates")
    p.add_argument("--sweep", action="store_true",
                   help="also report what every other threshold gives on the same routings (the best one for "
                        "precision >= 0.99 without / 0.95 with a named edited subject; needs relation ids, not "
                        "with --cross)")
    p.set_defaults(func=_eval_scope)

    p = sub.add_parser("bench-overhead", help="latency the memory wrapper adds to generate on out-of-scope queries")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scope", default="default")
    p.add_argument("--data", default=None, help="edit cases to fill the store with (default: none stored)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.set_defaults(func=_bench_overhead)


def _positive(value: Any, flag: str) -> None:
    if value is not None and value < 1:
        raise ValidationError(f"{flag} must be >= 1, got {value}")


def _train_scope(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    from memory.encoder import get_encoder
    from scope.classifier import check_name, save_scope, scope_root
    from scope.train import TrainSettings, train_scope

    # everything that can be wrong is checked before the data is read and the head trained
    check_name(args.name)
    if args.save_cosine:
        check_name(f"{args.name}-cosine")
    check_output_folder(scope_root(), "--name (the scope classifier folder)")
    encoder = get_encoder(args.encoder)

    overrides: dict[str, Any] = {"target_precision": args.target_precision}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.hidden is not None:
        overrides["hidden"] = args.hidden
    settings = TrainSettings(**overrides)
    if args.from_store:
        from memory.formats import case_from_record
        from memory.store import EditMemory

        with EditMemory.open(args.store, create=False, namespace=getattr(args, "namespace", "default")) as mem:
            cases = [case_from_record(r) for r in mem]
        source = f"store {args.store}"
    else:
        from memory.formats import read_cases

        cases = read_cases(args.data, args.format)
        source = args.data
    if args.limit is not None:
        cases = cases[:args.limit]
    head, cosine, report = train_scope(cases, encoder, settings, progress=True, source=source)
    head.info["command"] = " ".join(shlex.quote(a) for a in ["editmem", *sys.argv[1:]])
    folder = save_scope(head, args.name)
    if args.save_cosine:
        save_scope(cosine, f"{args.name}-cosine")
    h, c = report["heldout"]["head"], report["heldout"]["cosine"]
    print(f"scope classifier {args.name!r} v{head.info['version']} saved to {folder}")
    print(f"pairs: {report['pairs']['train_pairs']} training, {report['pairs']['heldout_pairs']} held out "
          f"({report['pairs']['heldout_cases']} held-out cases)")
    for label, m in (("trained head", h), ("cosine baseline", c)):
        cal, qm = m["calibration"], m["queries"]
        print(f"{label:16s} threshold {cal['threshold']:.4f}  held-out queries: precision {qm['precision']:.4f}  "
              f"recall {qm['recall']:.4f}  (wrong-edit rate {qm['wrong_edit_rate']:.4f}, locality FP rate "
              f"{qm['locality_false_positive_rate']:.4f}; pairs: precision {m['pairs']['precision']:.4f})"
              + ("" if cal["met"] else "  TARGET PRECISION NOT MET"))
    return 0


def _classifier(scope: str, threshold: float | None) -> Any:
    from editors.retrieval.setup import load_classifier

    return load_classifier(scope, threshold=threshold)


def _ask(args: argparse.Namespace) -> int:
    """Answer through the memory editor ``args.method`` (serac or ike) on the store, with the store's encoder."""
    if not args.question.strip():
        raise ValidationError("the question must not be empty")
    _positive(args.k, "-k")
    if args.demos is not None and args.demos < 0:
        raise ValidationError(f"--demos must be >= 0, got {args.demos}")
    from editors.adaptors import load_edited_model
    from editors.retrieval.session import memory_editor_settings, open_memory_editor

    options = {"counterfactual": args.counterfactual, "mode": args.mode, "demos": args.demos,
               "demo_file": args.demo_file}  # None: the method's default; a method refuses options it lacks
    # the store, the settings and the scope classifier are checked before the model loads
    memory_editor_settings(args.method, args.store, scope=args.scope, threshold=args.threshold, k=args.k, **options)
    model, tok = load_edited_model(args.model)
    editor = open_memory_editor(args.method, args.store, model, tok, scope=args.scope, threshold=args.threshold,
                                k=args.k, **options)
    try:
        from editors.consolidation import held_edits

        editor.model.router.held = held_edits(editor.memory, args.model)  # edits an edited folder's weights hold
        answer = editor.model.ask(args.question, max_new_tokens=args.max_new_tokens)
        _print_answer(answer)
        for line in editor.model.explain(0):
            print(f"-- {line}")
    finally:
        editor.memory.close()
    return 0


def _print_answer(answer: Any) -> None:
    print(answer.text.strip())
    d = answer.decision
    if d.edit is not None:
        print(f"-- shaped by edit {d.edit.id} v{d.edit.version} (score {d.score:.3f}, threshold {d.threshold:.3f}): "
              f"{d.edit.prompt} -> {d.edit.target_new}")
    elif d.weights is not None:
        print(f"-- {d.describe()}: {d.weights.prompt} -> {d.weights.target_new}")
    else:
        print(f"-- no edit in scope; the base model answered ({d.describe()})")


def _train_counterfactual(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    from editors.lm.loading import load_model
    from editors.retrieval.counterfactual import (
        CounterfactualSettings,
        counterfactual_dir,
        save_counterfactual,
        train_counterfactual,
    )
    from memory.formats import read_cases

    fields = ("steps", "batch_size", "train_layers", "lr", "val_cases", "val_every", "context")
    settings = CounterfactualSettings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    check_output_folder(counterfactual_dir(args.name).parent, "--name")
    cases = read_cases(args.data, args.format)[:args.limit]
    if not cases:
        raise ValidationError(f"{args.data}: no cases to train on")
    model, tok = load_model(args.model)
    cf, meta = train_counterfactual(model, tok, cases, settings, progress=True, data_name=args.data)
    meta["command"] = " ".join(shlex.quote(a) for a in ["editmem", *sys.argv[1:]])
    meta["model"] = args.model
    folder = save_counterfactual(cf, meta, args.name)
    print(f"counterfactual model {args.name!r} saved to {folder} ({meta['train_seconds']:.0f} s, best at step "
          f"{meta['best_step']})")
    _print_curve(meta, "held-out accuracy")
    return 0


def _print_curve(meta: dict[str, Any], measure: str) -> None:
    """The validation curve of a trained counterfactual model or chat adapter, one line per validation."""
    for point in meta["curve"]:
        scores = "  ".join(f"{k} {point[k]:.3f}" for k in ("copy", "update", "retain") if k in point)
        loss = "" if point["train_loss"] is None else f"  train loss {point['train_loss']:.3f}"
        print(f"  step {point['step']:5d}  {point['seconds']:7.1f} s  {measure}: {scores}{loss}")


def _train_chat_adapter(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    from editors.lm.loading import load_model
    from editors.retrieval.chat_adapter import ChatAdapterSettings, save_chat_adapter, train_chat_adapter
    from editors.retrieval.counterfactual import counterfactual_dir
    from memory.formats import read_cases

    fields = ("steps", "batch_size", "rank", "layers", "lr", "val_cases", "val_every")
    settings = ChatAdapterSettings(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    folder = counterfactual_dir(args.name)
    check_output_folder(folder.parent, "--name")
    cases = []
    for path in args.data:
        found = read_cases(path, skip_incomplete=True)[:args.limit]
        if not found:
            raise ValidationError(f"{path}: no cases to train on")
        cases.extend(found)
    model, tok = load_model(args.model)
    tensors, meta = train_chat_adapter(model, tok, cases, settings, progress=True, data=args.data)
    meta["command"] = " ".join(shlex.quote(a) for a in ["editmem", *sys.argv[1:]])
    meta["model"] = args.model
    save_chat_adapter(tensors, meta, folder)
    print(f"chat adapter {args.name!r} saved to {folder} ({meta['train_seconds']:.0f} s, best at step "
          f"{meta['best_step']})")
    _print_curve(meta, "held-out replies exact")
    return 0


def _train_relation_rerank(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    _positive(args.epochs, "--epochs")
    if args.skip < 0:
        raise ValidationError(f"--skip must be >= 0, got {args.skip}")
    if args.power is not None and not args.power > 0:
        raise ValidationError(f"--power must be > 0, got {args.power}")
    from dataclasses import replace
    from pathlib import Path

    from memory.encoder import get_encoder
    from memory.formats import read_cases
    from scope.relations import case_relations_for
    from scope.rerank import RelationReranker, RerankSettings, relation_texts

    # everything that can be wrong is checked before the model is trained
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValidationError(f"--out must name a .npz file, got {args.out!r}")
    if out.exists():
        raise ValidationError(f"{out} exists; choose a new file")
    check_output_folder(out.parent, "--out")
    if args.in_store and not args.scope:
        raise ValidationError("--in-store calibrates a head's threshold: give --scope NAME")
    encoder: Any = get_encoder(args.encoder)
    if args.scope:  # the texts are encoded again for the head's calibration (and for --in-store): remember them
        from memory.encoder import MemoEncoder

        encoder = MemoEncoder(encoder)
    head = _head_to_calibrate(args, encoder.name) if args.scope else None
    stop = None if args.limit is None else args.skip + args.limit
    cases = read_cases(args.data, args.format)[args.skip:stop]
    if not cases:
        raise ValidationError(f"no cases in {args.data} after --skip {args.skip}")
    relations = case_relations_for(cases, args.data, args.relations)
    if relations is None or not any(r is not None and not r.startswith("tmpl:") for r in relations):
        raise ValidationError(f"no case of {args.data} has a relation id (ROME-format CounterFact gives them; "
                              f"zsRE has none)")
    texts, labels = relation_texts(cases, relations)
    changes = {k: v for k, v in (("power", args.power), ("epochs", args.epochs)) if v is not None}
    settings = replace(RerankSettings(), **changes)
    reranker = RelationReranker.train(texts, labels, encoder, settings, progress=True)
    command = _parsed_command("train-relation-rerank", args, ("data", "out", "encoder"),
                              ("format", "skip", "scope", "limit", "relations", "power", "epochs", "in_store"))
    reranker.info.update({"command": command, "data": args.data, "cases": len(cases), "skip": args.skip})
    if head is not None:
        reranker.info["behind"] = _calibrate_behind(args, head, reranker, encoder)
    tmp = out.with_name(out.name + ".partial")
    reranker.save(tmp)
    tmp.replace(out)
    print(f"relation reranker saved to {out}: {len(reranker.relations)} relations from {len(texts):,} texts of "
          f"{len(cases):,} cases, training accuracy {reranker.info['train_accuracy']:.3f}, power {reranker.power}")
    return 0


def _head_to_calibrate(args: argparse.Namespace, encoder: str) -> Any:
    """The ``--scope`` head, checked to be one the reranker can be calibrated behind (a head, on the reranker's
    encoder, trained on ``--data``)."""
    from pathlib import Path

    clf = _classifier(args.scope, None)
    if clf.kind != "head":
        raise ValidationError(f"--scope {args.scope!r} is a {clf.kind} classifier; only a trained head is calibrated")
    if clf.encoder != encoder:
        raise ValidationError(f"--scope {args.scope!r} reads {clf.encoder} embeddings, the reranker {encoder}")
    source = (clf.info.get("training") or {}).get("source")
    if not source or Path(source).name != Path(args.data).name:
        raise ValidationError(f"--scope {args.scope!r} was trained on {source}; give that file as --data to calibrate "
                              f"behind it (its held-out cases are drawn from it)")
    return clf


def _calibrate_behind(args: argparse.Namespace, clf: Any, reranker: Any, encoder: Any) -> dict[str, Any]:
    """The head's threshold calibrated on its own held-out pairs with scores rescored by ``reranker``."""
    from dataclasses import fields

    from memory.formats import read_cases
    from scope.train import TrainSettings, build_pairs, heldout_calibration

    known = {f.name for f in fields(TrainSettings)}
    training = clf.info.get("training") or {}
    settings = TrainSettings(**{k: v for k, v in (training.get("settings") or {}).items() if k in known})
    cases = read_cases(args.data, args.format)  # the head's whole training file, not --skip / --limit
    pairs = build_pairs(cases, encoder, settings, progress=True)
    plain = heldout_calibration(clf, pairs, settings.target_precision)
    cal = heldout_calibration(clf, pairs, settings.target_precision, reranker)
    print(f"scope {args.scope!r} v{clf.info.get('version')}: threshold {clf.threshold:.4f} alone (held-out precision "
          f"{plain['precision']:.3f}, recall {plain['recall']:.3f}); behind the reranker "
          f"{cal['calibration']['threshold']:.4f} (precision {cal['precision']:.3f}, recall {cal['recall']:.3f})")
    behind = {**{key: clf.info.get(key) for key in ("name", "version", "created")},
              "threshold": cal["calibration"]["threshold"], "own_threshold": clf.threshold,
              "heldout": {"precision": cal["precision"], "recall": cal["recall"], "queries": cal["queries"]}}
    if args.in_store:  # the threshold chosen on pairs stays beside the one chosen on routings
        behind["pairs_threshold"] = behind["threshold"]
        behind.update(_calibrate_in_store(args, cases, clf, reranker, encoder, settings))
    return behind


def _calibrate_in_store(args: argparse.Namespace, cases: Sequence[Any], clf: Any, reranker: Any, encoder: Any,
                        settings: Any) -> dict[str, Any]:
    """``--in-store``: the threshold chosen on the routings of the head's held-out cases with every case of
    ``--data`` (``cases``) stored (:func:`scope.evaluate.calibrate_in_store`)."""
    from scope.evaluate import calibrate_in_store
    from scope.relations import case_relations_for
    from scope.train import heldout_cases

    relations = case_relations_for(cases, args.data, args.relations)
    if relations is None:
        raise ValidationError(f"--in-store needs relation ids for {args.data}")
    found = calibrate_in_store(clf, cases, relations, heldout_cases(len(cases), settings), encoder,
                               reranker=reranker, progress=True)
    best = found["sweep"]["best"]
    if best is None:
        raise ValidationError("no held-out query found a candidate edit: nothing to calibrate on")
    how = "meets both targets" if found["sweep"]["met"] else "MISSES the targets (the closest one)"
    print(f"in a store of {found['stored']:,} edits, {found['held_out_cases']:,} held-out cases routed: threshold "
          f"{best['threshold']:.4f} {how}: recall {best['recall']:.3f}, precision {best['precision_no_subject']:.3f} "
          f"without / {best['precision_named_subject']:.3f} with a named edited subject")
    return {"threshold": best["threshold"], "in_store": found}


def _eval_scope(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    from editors.retrieval.setup import load_rerankers
    from memory.encoder import get_encoder
    from memory.formats import read_cases
    from memory.store import EditMemory
    from scope.evaluate import routing_report
    from scope.relations import case_relations_for
    from scope.router import Router

    clf = _classifier(args.scope, args.threshold)
    cases = read_cases(args.data, args.format)[:args.limit]
    relations = case_relations_for(cases, args.data, args.relations)
    if args.sweep and (relations is None or args.cross):
        raise ValidationError("--sweep needs relation ids for the data (ROME-format CounterFact, see --relations) and "
                              "a router without --cross (the cross-encoder decides beside the threshold)")
    # as SERAC: the threshold calibrated behind the relation reranker, unless --threshold is given
    reranker, cross = load_rerankers(args.reranker, args.cross, classifier=clf,
                                     keep_threshold=args.threshold is not None)
    encoder = get_encoder(clf.encoder or DEFAULT_ENCODER)
    with EditMemory.open("sqlite://", encoder=encoder) as mem:
        records = mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject}
                                for c in cases], progress=True)
        report = routing_report(Router(mem, clf, k=args.k, reranker=reranker, cross=cross), cases,
                                [r.id for r in records], progress=True, relations=relations, sweep=args.sweep)
    if cross is not None:
        report["cross"] = {"folder": args.cross, "threshold": cross.threshold, "margin": cross.margin}
    report["scope"] = {"name": args.scope, "version": clf.info.get("version"), "kind": clf.kind}
    report["data"] = args.data
    print(json.dumps(report, indent=2))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


def _parsed_command(command: str, args: argparse.Namespace, required: Sequence[str],
                    optional: Sequence[str]) -> str:
    """``editmem COMMAND`` as parsed, for a manifest: the ``required`` options, then each of ``optional`` that was
    given (not None; ``--format`` not auto, ``--skip`` not 0; a flag when set, bare), spelled canonically."""
    parts = ["editmem", command]
    for name in (*required, *optional):
        value = getattr(args, name)
        if name in optional and (value is None or value is False or (name == "format" and value == "auto")
                                 or (name == "skip" and not value)):
            continue
        parts += ["--" + name.replace("_", "-")] + ([] if value is True else [str(value)])
    return shlex.join(parts)


def _train_rerank(args: argparse.Namespace) -> int:
    _positive(args.limit, "--limit")
    if args.skip < 0:
        raise ValidationError(f"--skip must be >= 0, got {args.skip}")
    from pathlib import Path

    from memory.encoder import get_encoder
    from memory.formats import read_cases
    from scope.classifier import HeadScope
    from scope.cross_rerank import CrossSettings, base_fingerprint, default_base, file_sha256, train_cross_reranker
    from scope.relations import case_relations_for

    # everything that can be wrong is checked before the data is read and the model trained
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValidationError(f"--out: {out} exists and is not an empty folder")
    check_output_folder(out.parent, "--out")
    names = {"max_pairs": "max_pairs", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "rank": "rank",
             "val_pairs": "val_pairs", "val_every": "val_every", "margin": "margin",
             "target_precision": "target_precision", "seed": "seed"}
    overrides = {field: getattr(args, flag) for flag, field in names.items() if getattr(args, flag) is not None}
    if "rank" in overrides:
        overrides["alpha"] = 2 * overrides["rank"]
    settings = CrossSettings(**overrides)
    clf = _classifier(args.scope, None)
    if not isinstance(clf, HeadScope):
        raise ValidationError(f"--scope {args.scope!r} is a {clf.kind} classifier; the reranker is calibrated behind "
                              "a trained scope head")
    base = Path(args.base) if args.base else default_base()
    fingerprint = base_fingerprint(base)
    encoder = get_encoder(args.encoder)
    cases = read_cases(args.data, args.format)[args.skip:]
    if args.limit is not None:
        cases = cases[:args.limit]
    relations = case_relations_for(cases, args.data, args.relations)
    info = {"command": _parsed_command("train-rerank", args, ("data", "out", "scope", "encoder"),
                                       ("format", "base", "relations", "recalibrate", "limit", "skip", *names)),
            "data": {"path": str(args.data), "sha256": file_sha256(args.data), "skip": args.skip,
                     "cases": len(cases)},
            "scope_classifier": {"name": args.scope, "version": clf.info.get("version"), "threshold": clf.threshold},
            "encoder": encoder.name}
    if args.recalibrate:
        return _recalibrate(args, out, cases, encoder, clf, relations, info)
    reranker, report = train_cross_reranker(cases, encoder, clf, settings, base=base, relations=relations,
                                            progress=True, info=info)
    folder = reranker.save(out)
    print(f"cross reranker saved to {folder} ({reranker.n_trainable():,} trained parameters, base "
          f"{base.name} {fingerprint[:12]}; pairs: {report['pairs']['train']} training, "
          f"{report['pairs']['validation']} validated; {report['seconds']['train']:.0f} s)")
    print("validation (held-out pairs):")
    for point in report["training"]["validation"]:
        print("  " + "  ".join(f"{k} {v}" for k, v in point.items()))
    _print_heldout(report["heldout_routing"], reranker.threshold)
    return 0


def _recalibrate(args: argparse.Namespace, out: Any, cases: Any, encoder: Any, clf: Any, relations: Any,
                 info: dict[str, Any]) -> int:
    from dataclasses import replace

    from scope.cross_rerank import CrossReranker, calibrate_cross

    reranker = CrossReranker.load(args.recalibrate, base=args.base)
    changes = {k: getattr(args, k) for k in ("margin", "target_precision") if getattr(args, k) is not None}
    if changes:
        reranker.settings = replace(reranker.settings, **changes)
        reranker.margin = reranker.settings.margin
    report = calibrate_cross(reranker, cases, encoder, clf, relations=relations, progress=True,
                             info={"command": info["command"], "data": info["data"], "from": args.recalibrate})
    folder = reranker.save(out)
    print(f"cross reranker {args.recalibrate} recalibrated and saved to {folder}")
    _print_heldout(report["heldout_routing"], reranker.threshold)
    return 0


def _print_heldout(ho: dict[str, Any], threshold: float) -> None:
    print(f"held-out queries ({ho['queries']}, {ho['positive_queries']} in scope), scope threshold "
          f"{ho['scope_threshold']:.4f}, combined threshold {threshold:.4f}; "
          f"{ho['gated_pairs_per_query']} gated pairs a query, {ho['scoring_ms_per_pair']} ms a pair:")
    for label in ("head", "head+cross"):
        m = ho[label]
        print(f"  {label:11s} precision {m['precision']:.4f}  recall {m['recall']:.4f}  wrong edit "
              f"{m['wrong_edit']}  locality FP {m['locality_fp']}")


def _bench_overhead(args: argparse.Namespace) -> int:
    from editors.lm.loading import load_model
    from editors.retrieval.augmented import AugmentedModel, measure_overhead
    from memory.encoder import get_encoder
    from memory.store import EditMemory

    clf = _classifier(args.scope, None)
    model, tok = load_model(args.model)
    encoder = get_encoder(clf.encoder or DEFAULT_ENCODER)
    prompts = ["The tallest mountain on Earth is", "Water boils at a temperature of", "The author of Hamlet is",
               "A popular programming language is", "The largest ocean in the world is"]
    with EditMemory.open("sqlite://", encoder=encoder) as mem:
        if args.data:
            from memory.formats import read_cases

            cases = read_cases(args.data)[:args.limit]
            mem.add_many([{"prompt": c.prompt, "target_new": c.target_new, "subject": c.subject} for c in cases])
        wrapper = AugmentedModel(model, tok, mem, clf)
        report = measure_overhead(wrapper, prompts, new_tokens=args.new_tokens, repeats=args.repeats)
        report["stored_edits"] = len(mem)
    print(json.dumps(report, indent=2))
    return 0

"""`editmem serve`: the HTTP service (OpenAI-compatible inference through the memory, the edit store, the page).

    editmem serve [--store URL] [--model NAME|PATH|none] [--method serac|ike] [--scope NAME] [--threshold T] [-k K]
                  [--host 127.0.0.1] [--port 8000] [--api-keys FILE] [--threads N] [--max-body-bytes B]
                  [--max-tokens N] [--max-n N] [--max-batch N] [--batch-wait S] [--max-prompt-tokens N]
                  [--cors-origin URL ...] [--weights-dir DIR]
                  [--consolidate-every N [--consolidate-method memit] [--consolidate-out DIR]
                   [--consolidate-set KEY=VALUE ...]]
                  [--upstream URL [--upstream-key KEY]] [--namespace NAME] [--ike-demos N] [--ike-demo-file FILE]
                  [--ike-demo-limit N]

Binds to loopback by default; any other address needs API keys (--api-keys or $EDITMEM_API_KEYS_FILE).
``--namespace`` (the global option, or $EDITMEM_NAMESPACE) is the store namespace of requests that name none and whose
key is not bound to one.

Serving an edited model folder of the store (``--model DIR``, written by ``editmem consolidate --out DIR``), the
memory router leaves the edits DIR's weights hold to them. ``--consolidate-every N`` makes the server apply the policy
"memory first, the weights as the fallback" itself: after each write through it, when N or more edits of its
``--namespace`` are pending, a background job (``/v1/admin/jobs``, kind ``auto-consolidate``) writes the oldest, in
whole groups of N, into DIR with ``--consolidate-method`` and then into the loaded model in place (between generate
calls), so they answer from the weights without a restart. ``--consolidate-out DIR`` names the folder when
``--model`` is its base (a new folder is created from the served model at start).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from typing import Any

from memory.errors import ValidationError
from serve.options import key_values

DEFAULT_THREADS = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the memory over HTTP: OpenAI-compatible inference, /v1/edits, a web page")
    p.add_argument("--model", default="smollm2-135m", help="model alias, local folder, or 'none' to serve only the "
                                                           "edit store (default: %(default)s)")
    p.add_argument("--method", default="serac", choices=["serac", "ike"], help="default memory method")
    p.add_argument("--scope", default="default", help="scope classifier name or 'cosine' (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=None, help="override the classifier's threshold")
    p.add_argument("-k", type=int, default=5, help="candidates retrieved per query (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", default=None, help="file of 'KEY ROLE [NAMESPACE]' lines (roles read, write, admin; "
                                                    "a key with a NAMESPACE can use only that one; default: "
                                                    "$EDITMEM_API_KEYS_FILE)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch intra-op threads (default: %(default)s; a server shares its machine, and OpenMP "
                        "threads spinning against other jobs made a 2-core machine 15x slower)")
    p.add_argument("--max-batch", type=int, default=8, help="greedy requests waiting together share one generate "
                                                           "call of at most this many (1: no batching; default: "
                                                           "%(default)s)")
    p.add_argument("--batch-wait", type=float, default=0.2,
                   help="seconds a generate call waits at most for requests sure to come soon (being routed, or "
                        "the clients the last call answered), so that concurrent clients share it (0: never wait; "
                        "default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens")
    p.add_argument("--max-n", type=int, default=8, help="cap on a request's n")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--upstream", default=None, help="proxy mode: the /v1 URL of an OpenAI-compatible server to "
                                                    "forward to (no local model is loaded: the store, its encoder "
                                                    "and the scope classifier route)")
    p.add_argument("--ike-demos", type=int, default=None, help="IKE: demonstrations per prompt (default: IKE's)")
    p.add_argument("--ike-demo-file", default=None, help="IKE: the demonstration pool file (default: "
                                                         "counterfact-train.json under $EDITMEM_DATA)")
    p.add_argument("--ike-demo-limit", type=int, default=None, help="IKE: use only the pool file's first N cases")
    p.add_argument("--chat-context", default=None,
                   help="proxy mode: how an in-scope edit enters a chat request, a name of "
                        "editors.retrieval.augmented.CHAT_CONTEXTS (default: exchange2-only, as the local model's "
                        "chat answers)")
    p.add_argument("--upstream-key", default=None, help="key sent to the upstream (default: $EDITMEM_UPSTREAM_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (CORS is off without)")
    p.add_argument("--weights-dir", default=None, help="folder under which POST /v1/admin/consolidate saves edited "
                                                       "models (default: $EDITMEM_CACHE/weights)")
    p.add_argument("--consolidate-every", type=int, default=None, metavar="N",
                   help="after writes, when N or more edits are pending, consolidate the oldest (whole groups of N) "
                        "into the served model's folder and the loaded model (default: never)")
    p.add_argument("--consolidate-method", default="memit",
                   help="weight editor for --consolidate-every (memit, alphaedit, rome, ft) or grace (a codebook "
                        "adaptor in the folder, followed the same way; default: %(default)s)")
    p.add_argument("--consolidate-out", default=None, metavar="DIR",
                   help="the edited model folder for --consolidate-every (default: --model, which must be one of "
                        "the store's; a new DIR is made from the served model, its base)")
    p.add_argument("--consolidate-set", dest="consolidate_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a setting of --consolidate-method, as consolidate --set; repeatable")
    p.set_defaults(func=_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    ike = {"demos": args.ike_demos, "demo_file": args.ike_demo_file, "demo_limit": args.ike_demo_limit}
    ike = {key: value for key, value in ike.items() if value is not None}
    options: dict[str, Any] = {"ike": ike} if ike else {}
    if args.chat_context is not None:
        if not args.upstream:
            raise ValidationError("--chat-context is for proxy mode (--upstream URL); the local model's chat "
                                  "answers use exchange2-only")
        options["chat_context"] = args.chat_context
    return options


def _serve(args: argparse.Namespace) -> int:
    for flag, value in (("--port", args.port), ("--threads", args.threads), ("-k", args.k),
                        ("--max-tokens", args.max_tokens), ("--max-n", args.max_n), ("--max-batch", args.max_batch),
                        ("--max-body-bytes", args.max_body_bytes), ("--max-prompt-tokens", args.max_prompt_tokens)):
        if value < 1:
            raise ValidationError(f"{flag} must be >= 1, got {value}")
    if args.consolidate_every is not None and args.consolidate_every < 1:
        raise ValidationError(f"--consolidate-every must be >= 1, got {args.consolidate_every}")
    if args.consolidate_every is None and (args.consolidate_out or args.consolidate_overrides):
        raise ValidationError("--consolidate-out and --consolidate-set go with --consolidate-every N")
    if not 0 <= args.batch_wait <= 10:
        raise ValidationError(f"--batch-wait must be between 0 and 10 seconds, got {args.batch_wait}")
    import torch
    import uvicorn

    from editors.retrieval.service import Limits
    from serve.http.app import ServerSettings, create_app
    from serve.http.auth import load_keys

    if not is_loopback(args.host) and load_keys(args.api_keys) is None:
        raise ValidationError(f"refusing to bind {args.host} without API keys: give --api-keys FILE (or "
                              "$EDITMEM_API_KEYS_FILE), or bind 127.0.0.1")
    torch.set_num_threads(args.threads)
    settings = ServerSettings(store=args.store, model=args.model, method=args.method, scope=args.scope,
                              threshold=args.threshold, k=args.k, api_keys=args.api_keys,
                              max_body_bytes=args.max_body_bytes, max_batch=args.max_batch,
                              batch_wait=args.batch_wait,
                              limits=Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                                            max_n=args.max_n),
                              cors_origins=tuple(args.cors_origin), upstream=args.upstream,
                              upstream_key=args.upstream_key, namespace=getattr(args, "namespace", "default"),
                              options=_method_options(args), weights_dir=args.weights_dir,
                              consolidate_every=args.consolidate_every, consolidate_method=args.consolidate_method,
                              consolidate_out=args.consolidate_out,
                              consolidate_settings=key_values(args.consolidate_overrides, example="layers=[3,4]"))
    logging.getLogger("editmem.http").setLevel(logging.INFO)
    app = create_app(settings)
    front = f"in front of {args.upstream}" if args.upstream else f"with {args.model}"
    live = app.state.ctx.live
    if live is not None:
        policy = (f"; every {args.consolidate_every} pending edits go into it with {args.consolidate_method}"
                  if args.consolidate_every else "")
        front += f" (following the weight records of {live.folder}{policy})"
    print(f"editmem: serving {args.store} (namespace {settings.namespace}) {front} on "
          f"http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning",
                timeout_graceful_shutdown=30)
    return 0

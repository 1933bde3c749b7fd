"""``eagle3-jax serve``: an OpenAI-compatible HTTP server with continuous batching (docs/architecture.md#serving)."""

from __future__ import annotations

import json
import os
import sys

from eagle3_jax.cli.options import (
    ATTENTION_CHOICES,
    HelpFormatter,
    add_head_overrides,
    add_mesh_options,
    add_tree_options,
    check_configs,
    draft_tree,
    head_overrides,
    int_list,
    int_type,
    load_tokenizer,
    mesh_from_args,
    non_negative_int,
    positive_float,
    positive_int,
)

port_number = int_type("a port number in [0, 65535]", 0, 65535)

EPILOG = (
    "Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streamed as server-sent "
    "events with \"stream\": true), GET /health, GET /metrics (Prometheus). Request parameters: max_tokens "
    "(max_completion_tokens), temperature, top_p, top_k, seed, stop (strings, or token ids), stop_token_ids, "
    "ignore_eos, stream_options.include_usage, chat_template_kwargs. Every response carries usage. "
    "Example: eagle3-jax serve --target Qwen/Qwen3-4B-Thinking-2507 --draft DIR --port 8000, then "
    "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' "
    "-d '{\"model\": \"Qwen3-4B-Thinking-2507\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'"
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API, with continuous batching",
        description="Serve a Qwen3, Qwen2 or Llama target (with an EAGLE-3 head: speculative decoding) over "
                    "OpenAI's /v1/completions and /v1/chat/completions. Requests share a batch of --max-batch "
                    "rows; a finished request's row takes the next waiting one between chunks of the decoding "
                    "loop (continuous batching). Greedy requests (temperature 0) get the tokens of "
                    "'eagle3-jax generate' on their prompt alone with the same --max-cache-len (exactly in float32).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR",
                   help="target model: an HF directory, a converted directory, or a Hub id")
    p.add_argument("--draft", metavar="DIR", default=None,
                   help="EAGLE-3 draft head (SpecForge/SGLang format or converted); enables speculative decoding")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 for every interface: mind who can reach it)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the name clients send as 'model' (default: the target directory's or Hub id's last part; "
                        "--target as given is accepted too)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="B",
                   help="requests decoded together (batch rows; a compiled shape)")
    p.add_argument("--max-cache-len", type=positive_int, default=None, metavar="S",
                   help="KV slots per request, prompt and completion together (a compiled shape; default the "
                        "model's context, at most 4096)")
    p.add_argument("--max-queue", type=positive_int, default=256, metavar="Q",
                   help="requests waiting for a row at most; beyond, requests get 503 with Retry-After")
    p.add_argument("--chunk", type=positive_int, default=4, metavar="C",
                   help="loop iterations between admissions of waiting requests (smaller: sooner, more host work)")
    p.add_argument("--admission", choices=["continuous", "static"], default="continuous",
                   help="continuous: a freed row takes a waiting request at once; static: waiting requests start "
                        "only when the whole batch has finished (for comparison)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template file for /v1/chat/completions, replacing the tokenizer's own")
    p.add_argument("--reasoning-parser", choices=["auto", "qwen3", "none"], default="auto",
                   help="split chat replies at </think> into reasoning_content and content (auto: when the "
                        "tokenizer has a </think> token)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="parameter/activation dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help="attention backend")
    add_mesh_options(p, distributed=False,
                     data_help="split the batch's rows over M groups of devices (--max-batch must be a multiple of "
                               "M); uses M x N devices in all")
    p.add_argument("--warmup-buckets", type=int_list, default=[16, 32, 64, 128, 256, 512], metavar="N,N,...",
                   help="prompt lengths whose prefill programs are compiled before listening (prompts are padded "
                        "to the next power of two >= 16; others compile on their first request)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="compile nothing before listening (the first requests then wait for the compiler)")
    p.add_argument("--log-requests", action="store_true", help="log every HTTP request (uvicorn's access log)")
    p.add_argument("--json", action="store_true",
                   help="print the ready line on stdout as JSON: {\"event\": \"ready\", \"url\": ..., ...}")
    limits = p.add_argument_group(
        "limits (against hostile or careless clients; docs/bad-input.md#the-server)",
        "Checked before the work they protect: a request past one gets 400, 408 or 413 with OpenAI's error body "
        "naming the limit, and never slows the others down.")
    limits.add_argument("--max-body-bytes", type=positive_int, default=2 * 2**20, metavar="N",
                        help="a request body's size at most (413 beyond, before it is read; parsing a body's JSON "
                             "holds Python's lock for up to about 0.1 s per MiB, so keep it near what prompts need)")
    limits.add_argument("--max-prompt-chars", type=positive_int, default=None, metavar="N",
                        help="characters of a text prompt, or of a chat's messages together, at most (default: "
                             "four times what the KV cache could hold, by the vocabulary's longest token)")
    limits.add_argument("--max-messages", type=positive_int, default=1024, metavar="N",
                        help="messages in a chat at most")
    limits.add_argument("--max-stop-strings", type=non_negative_int, default=16, metavar="N",
                        help="stop strings per request at most")
    limits.add_argument("--max-stop-chars", type=positive_int, default=1024, metavar="N",
                        help="characters of one stop string at most")
    limits.add_argument("--max-json-depth", type=positive_int, default=32, metavar="N",
                        help="nesting of arrays and objects in a request body at most")
    limits.add_argument("--prepare-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help="time to parse a request, render its chat template and tokenize it, at most (on a "
                             "worker thread, never the event loop; interrupted past it: 400)")
    limits.add_argument("--header-timeout", type=positive_float, default=10.0, metavar="SECONDS",
                        help="time a client may take to send a request's line and headers (the connection is "
                             "closed after it)")
    limits.add_argument("--body-timeout", type=positive_float, default=30.0, metavar="SECONDS",
                        help="time a request's whole body may take to arrive (408 after it)")
    limits.add_argument("--max-connections", type=positive_int, default=1024, metavar="N",
                        help="open connections at most, idle ones included (a request on one beyond gets 503)")
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    add_tree_options(spec)
    add_head_overrides(spec)
    p.set_defaults(func=run)


def model_name(target: str) -> str:
    """The default served name: the last part of the directory or Hub id."""
    return os.path.basename(os.path.normpath(target)) or target


def generation_defaults(model_dir: str):
    """Sampling defaults from the target's generation_config.json (as vLLM uses them), else OpenAI's."""
    from eagle3_jax.serve.protocol import Defaults

    path = os.path.join(model_dir, "generation_config.json")
    defaults = Defaults()
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return defaults
    if not isinstance(cfg, dict):
        return defaults
    if cfg.get("do_sample") is False:
        return Defaults(temperature=0.0)
    t, p, k = cfg.get("temperature"), cfg.get("top_p"), cfg.get("top_k")
    if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t <= 2:
        defaults.temperature = float(t)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1:
        defaults.top_p = float(p)
    if isinstance(k, int) and not isinstance(k, bool) and k >= 0:
        defaults.top_k = k
    return defaults


def limits_of(args):
    """The server's :class:`~eagle3_jax.serve.protocol.Limits` from the command line."""
    from eagle3_jax.serve.protocol import Limits

    return Limits(max_body_bytes=args.max_body_bytes, max_json_depth=args.max_json_depth,
                  max_prompt_chars=args.max_prompt_chars, max_messages=args.max_messages,
                  max_stop_strings=args.max_stop_strings, max_stop_chars=args.max_stop_chars,
                  prepare_timeout=args.prepare_timeout, header_timeout=args.header_timeout,
                  body_timeout=args.body_timeout, max_connections=args.max_connections)


def http_url(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(args) -> int:
    from eagle3_jax.cli.signals import check

    # Ctrl-C / SIGTERM at any moment of the start-up stop it (exit 130: cli.main guards both signals, and the
    # start-up checks between its phases for one that a library swallowed); once uvicorn serves, its own
    # handlers stop it gracefully, and the signal it raises again afterwards ends it with exit 0.
    engine = sock = None
    try:
        server, sock, engine, announce = _start(args)
        check()
        return _serve(args, server, sock, announce)
    finally:
        if engine is not None:
            engine.stop()
        if sock is not None:
            sock.close()


def _start(args):
    """Everything before serving, phase by phase with a signal check between phases: (the Server, the
    bound socket, the started engine, the function that announces readiness)."""
    import socket

    from eagle3_jax.cli.signals import check
    from eagle3_jax.errors import InputError

    spec = draft_tree(args)
    template = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                template = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--chat-template: can not read {args.chat_template} ({e})") from None
    model_dir, target_config, draft_dir, draft_config = check_configs(args.target, args.draft,
                                                                      **head_overrides(args))
    if args.max_batch % args.data_parallel:
        raise InputError(f"--max-batch ({args.max_batch}) must be a multiple of --data-parallel "
                         f"({args.data_parallel}): each data shard holds max_batch / {args.data_parallel} rows")
    mesh = mesh_from_args(args, target_config)
    context = target_config.max_position_embeddings
    if args.max_cache_len is not None and not 2 <= args.max_cache_len <= context:
        raise InputError(f"--max-cache-len must be between 2 and the model's context ({context}), "
                         f"got {args.max_cache_len}")
    check()
    # Bind first: a port in use is an error before minutes of loading.
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except (OSError, OverflowError) as e:
        raise InputError(f"can not listen on {args.host}:{args.port} ({getattr(e, 'strerror', None) or e})") \
            from None
    engine = None
    try:
        from eagle3_jax.generation import Generator
        from eagle3_jax.loading import load_draft, load_target
        from eagle3_jax.serve.app import Server, reasoning_model
        from eagle3_jax.serve.engine import BatchEngine

        check()
        tokenizer = load_tokenizer(model_dir, required=False)
        check()
        if template is not None:
            if tokenizer is None:
                raise InputError("--chat-template needs the target's tokenizer, and it has none that loads")
            tokenizer.chat_template = template
        reasoning = args.reasoning_parser == "qwen3" or (args.reasoning_parser == "auto" and tokenizer is not None
                                                         and reasoning_model(tokenizer))
        target = load_target(model_dir, dtype=args.dtype, progress=not args.json, mesh=mesh)
        check()
        draft = None
        if draft_dir is not None:
            draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=not args.json, mesh=mesh,
                               **head_overrides(args))
            check()
        gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                        num_draft_tokens=spec.num_draft_tokens if spec else None,
                        tokenizer=tokenizer if tokenizer is not None else False, attention=args.attention, mesh=mesh)
        engine = BatchEngine(gen, max_batch=args.max_batch, max_cache_len=args.max_cache_len, chunk=args.chunk,
                             max_queue=args.max_queue, admission=args.admission)
        check()
        engine.start()
        check()
        if args.warmup:
            seconds = engine.warmup(sorted({min(max(n, 1), engine.capacity - 1) for n in args.warmup_buckets}))
            print(f"compiled in {seconds:.1f} s", file=sys.stderr)
            check()
        name = args.served_model_name or model_name(args.target)
        server = Server(engine, model_name=name, tokenizer=tokenizer, reasoning=reasoning,
                        defaults=generation_defaults(model_dir), aliases=(args.target,), limits=limits_of(args))
    except BaseException:
        if engine is not None:
            engine.stop()
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    url = http_url(host, port)
    ready = {"event": "ready", "url": url, "model": name, "max_batch": engine.max_batch,
             "max_cache_len": engine.capacity, "speculative": engine.speculative}

    def announce() -> None:  # once uvicorn listens, with its signal handlers in place
        if args.json:
            print(json.dumps(ready), flush=True)
        else:
            tree = f", tree {gen.spec.num_steps},{gen.spec.topk},{gen.spec.num_draft_tokens}" if gen.spec else ""
            print(f"serving {name} at {url}/v1 (batch {engine.max_batch}, cache {engine.capacity}{tree}); "
                  "Ctrl-C stops", file=sys.stderr, flush=True)

    return server, sock, engine, announce


def _serve(args, server, sock, announce) -> int:
    """Serves until Ctrl-C or SIGTERM; the requests in flight then end with 503 (exit 0)."""
    import uvicorn

    from eagle3_jax.serve.app import create_app
    from eagle3_jax.serve.http import GracefulServer, guarded_protocol

    limits = server.limits
    config = uvicorn.Config(create_app(server, on_ready=announce), log_level="warning",
                            access_log=args.log_requests, timeout_graceful_shutdown=5,
                            # (uvicorn counts the connection asking among its connections: one more serves N)
                            http=guarded_protocol(limits.header_timeout), limit_concurrency=limits.max_connections + 1,
                            h11_max_incomplete_event_size=64 * 1024)
    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the signal again (cli.main's guard turns it into
    # a KeyboardInterrupt): that is a normal end here.
    try:
        GracefulServer(config, server.begin_shutdown).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print("stopped", file=sys.stderr)
    return 0


"""``eagle3-jax generate``: continue prompts with a target, optionally with an EAGLE-3 head."""

from __future__ import annotations

import argparse
import json
import sys

from eagle3_jax.cli.options import (
    COMPILE_MESSAGES,
    EXIT_ERROR,
    HelpFormatter,
    add_head_overrides,
    add_mesh_options,
    add_runtime_options,
    add_sampling_options,
    add_tree_options,
    check_configs,
    check_text,
    draft_tree,
    encode,
    head_overrides,
    int_list,
    is_main_process,
    load_tokenizer,
    mesh_from_args,
    positive_int,
    start_distributed,
    usage,
)
from eagle3_jax.defaults import DEFAULT_MAX_NEW_TOKENS

JSON_EPILOG = (
    "--json output: one JSON object per line. First one per prompt, in order: prompt_index, text (the generated "
    "text, special tokens and a final stop token left out, cut before a stop string; null without a tokenizer), "
    "reasoning and answer (text split at </think> for thinking models, stripped; reasoning is null when the "
    "reply has no </think> and the prompt opened no <think>), token_ids (the generated tokens; with "
    "finish_reason stop, those covering text), finish_reason (eos, stop, length or nonfinite), "
    "num_target_forwards (after the prefill), accept_lengths (tokens committed per target forward), "
    "acceptance_length (1.0 for plain decoding), prompt_length, tokens_per_second. Then one line "
    '{"batch": {...}} with what the batch shares: prompts, generated_tokens, prefill_seconds, decode_seconds, '
    "compile_seconds and tokens_per_second (all generated tokens over prefill and decode time)."
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a target model",
        description="Generate continuations of one or more prompts with a Qwen3, Qwen2 or Llama target. "
                    "Several --prompt (or --prompt-ids) options form one batch.",
        epilog=JSON_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--target", required=True, metavar="DIR",
                   help="target model: an HF directory, a converted directory, or a Hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help="prompt text, tokenized with the target's tokenizer (repeat for a batch)")
    src.add_argument("--prompt-ids", action="append", type=int_list, metavar="IDS",
                     help="prompt as comma-separated token ids, no tokenizer needed (repeat for a batch)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each --prompt as a user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help="generated tokens per prompt at most")
    add_sampling_options(p)
    p.add_argument("--stop-ids", type=int_list, default=None, metavar="IDS",
                   help="comma-separated token ids that end generation (default: the model's eos ids)")
    p.add_argument("--no-stop", action="store_true", help="do not stop at eos; generate max-new-tokens")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="a stop string: a prompt's generation ends once its text holds it, and the text is cut "
                        "before it (finish_reason stop); repeat for several; needs the target's tokenizer "
                        "(in bash, $'\\n\\n' is two newlines)")
    add_runtime_options(p)
    add_mesh_options(p)
    spec = p.add_argument_group("speculative decoding (EAGLE-3)")
    spec.add_argument("--draft", metavar="DIR", default=None,
                      help="EAGLE-3 draft head (SpecForge/SGLang format or converted); enables speculative decoding")
    add_tree_options(spec)
    add_head_overrides(spec)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are committed (default: on for one prompt without --json)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt, then one for the batch, instead of text (see below)")
    p.set_defaults(func=run)


def weights_bytes(config, dtype) -> int:
    """The bytes of a target's weights in ``dtype`` (for the memory check before loading)."""
    import numpy as np

    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * c.hidden_size * c.intermediate_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return (c.num_hidden_layers * per_layer + embed) * np.dtype(dtype).itemsize


def run(args) -> int:
    from eagle3_jax.errors import InputError
    from eagle3_jax.generation import Generator
    from eagle3_jax.loading import load_draft, load_target, parse_dtype
    from eagle3_jax.planning import check_memory, plan_batch
    from eagle3_jax.sampling import SamplingParams
    from eagle3_jax.sharding import ShardingPlan
    from eagle3_jax.text import check_stop_strings

    if args.chat and not args.prompt:
        raise usage("--chat needs --prompt")
    if args.stream and args.json:
        raise usage("--stream prints text; it can not be combined with --json")
    spec = draft_tree(args)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    stop_strings = check_stop_strings([check_text(t, "--stop") for t in args.stop or []])
    overrides = head_overrides(args)
    model_dir, target_config, draft_dir, draft_config = check_configs(args.target, args.draft, **overrides)
    start_distributed(args)
    mesh = mesh_from_args(args, target_config)
    tokenizer = load_tokenizer(model_dir, required=bool(args.prompt))
    if stop_strings and tokenizer is None:
        raise InputError(f"--stop needs the target's tokenizer, and {model_dir} has none that loads")
    prompts = [encode(tokenizer, t, args.chat) for t in args.prompt] if args.prompt else args.prompt_ids
    stops = () if args.no_stop else args.stop_ids
    dtype = parse_dtype(args.dtype)
    prompts, settings, _, bucket = plan_batch(
        target_config, prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stops,
        max_cache_len=args.max_cache_len, cache_dtype=dtype, attention=args.attention)
    plan = ShardingPlan.for_target(mesh, target_config) if mesh is not None else None
    rows = -(-len(prompts) // plan.data_parallel) * plan.data_parallel if plan else len(prompts)
    check_memory(target_config, settings, rows, bucket, draft_config=draft_config, spec=spec,
                 weights_bytes=weights_bytes(target_config, dtype) // (plan.tensor_parallel if plan else 1), plan=plan)

    main = is_main_process()
    progress = main and not args.json
    if plan is not None and progress:
        print(plan.describe(), file=sys.stderr)
    target = load_target(model_dir, dtype=args.dtype, progress=progress, check_finite=args.check_finite, mesh=mesh)
    draft = None
    if draft_dir is not None:
        draft = load_draft(draft_dir, target.config, dtype=args.dtype, progress=progress,
                           check_finite=args.check_finite, mesh=mesh, **overrides)
    gen = Generator(target, draft, num_steps=spec.num_steps if spec else None, topk=spec.topk if spec else None,
                    num_draft_tokens=spec.num_draft_tokens if spec else None, max_cache_len=args.max_cache_len,
                    tokenizer=tokenizer if tokenizer is not None else False, attention=args.attention, mesh=mesh)
    opened = [thinking_opened(tokenizer, p) for p in prompts]
    stream = args.stream if args.stream is not None else (len(prompts) == 1 and not args.json)
    printer = StreamPrinter(tokenizer, len(prompts), stop_strings, opened[0]) if stream and main else None
    # every process of a --distributed run runs the loop in the same chunks (reading tokens between them is a
    # collective): the others stream into nothing
    callback = printer if main or not stream else _discard
    outputs = gen.generate(prompts, max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                           stop_token_ids=stops, stop=stop_strings or None, stream=callback)
    if not main:  # the other processes of a --distributed run computed the same outputs
        return 0
    if args.json:
        print_json(outputs)
    else:
        print_text(outputs, printer, opened, speculative=draft is not None)
    return check_finite_outputs(outputs)


def _discard(row: int, token_ids: list[int]) -> None:
    """The stream callback of the processes that do not print."""


def thinking_opened(tokenizer, prompt: list[int]) -> bool:
    """Whether the prompt ends inside an open <think> block (the reply then starts with reasoning)."""
    from eagle3_jax.text import prompt_opens_thinking

    return tokenizer is not None and prompt_opens_thinking(tokenizer, prompt)


def print_json(outputs) -> None:
    """One line per prompt, then one ``{"batch": ...}`` line with the timings the batch shares (see JSON_EPILOG)."""
    from eagle3_jax.generation import batch_summary

    for i, out in enumerate(outputs):
        print(json.dumps({"prompt_index": i, **out.to_json(batch_fields=False)}), flush=True)
    print(json.dumps({"batch": batch_summary(outputs)}), flush=True)


def print_text(outputs, printer, opened: list[bool], *, speculative: bool) -> None:
    """Each reply (a thinking model's reasoning and answer under their own headings) and a stats line on stderr;
    in a batch, each reply under a ``[prompt i]`` heading line, so that the replies stay apart."""
    for i, out in enumerate(outputs):
        if len(outputs) > 1 and not (printer is not None and i == 0):  # (a streamed row 0 printed its own)
            print(prompt_heading(i), flush=True)
        if printer is not None and i == 0:
            printer.finish(out.text)  # row 0 was streamed; the others print when done
        elif out.text is not None:
            print(shown(out.text, opened[i]), flush=True)
        else:
            print(",".join(map(str, out.token_ids)), flush=True)
        spec_note = f", acceptance {out.acceptance_length:.2f}" if speculative else ""
        print(f"[{len(out.token_ids)} tokens, finish={out.finish_reason}, {out.tokens_per_second:.1f} tok/s, "
              f"forwards={out.num_target_forwards}{spec_note}, compile {out.compile_seconds:.1f}s]", file=sys.stderr)


# How a reply is printed: a thinking model's tags become headings (longest patterns first).
SHOWN_TAGS = (("<think>\n", "[reasoning]\n"), ("<think>", "[reasoning]\n"), ("</think>\n\n", "\n[answer]\n"),
              ("</think>", "\n[answer]\n"))


def prompt_heading(index: int) -> str:
    """The line that opens a batch's reply ``index`` in text output."""
    return f"[prompt {index}]"


def shown(text: str, opened: bool) -> str:
    """``text`` as printed: ``<think>`` and ``</think>`` replaced by [reasoning] and [answer] headings,
    and [reasoning] first when the prompt opened the thinking block. Printing the shown text of a
    growing reply piece by piece gives the shown text of the whole (see :class:`StreamPrinter`)."""
    for tag, heading in SHOWN_TAGS:
        text = text.replace(tag, heading)
    return SHOWN_TAGS[0][1] + text if opened else text


def check_finite_outputs(outputs) -> int:
    """Exit status 1 with an error line when a row stopped on non-finite logits (broken weights or numerics)."""
    from eagle3_jax.generation import nonfinite_message

    message = nonfinite_message(outputs)
    if message is None:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


class StreamPrinter:
    """Prints row 0's tokens as they are committed (decoded text when a tokenizer is known).

    Text that could be the beginning of a stop string or of a thinking tag is
    held back until the next tokens tell, so the printed text is the final
    text (:func:`shown`), cut before a stop string.
    """

    def __init__(self, tokenizer, rows: int, stops: tuple[str, ...] = (), opened: bool = False):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.stops = tuple(stops)
        self.opened = opened
        self.printed = ""  # what was written, in the shown form (or token ids without a tokenizer)
        self.heading = prompt_heading(0) + "\n" if rows > 1 else ""  # a batch's replies stay apart

    def __call__(self, row: int, new_tokens: list[int]) -> None:
        if row != 0:
            return
        self.tokens.extend(new_tokens)
        if self.tokenizer is None:
            chunk = ("," if self.printed else "") + ",".join(map(str, new_tokens))
            self.printed += chunk
            self._start()
            sys.stdout.write(chunk)
            sys.stdout.flush()
            return
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        self._write(text, final=False)

    def _write(self, text: str, final: bool) -> None:
        from eagle3_jax.text import cut_at_stop, partial_stop_length

        cut = cut_at_stop(text, self.stops) if self.stops else None
        if cut is not None:
            text = cut
        elif not final:
            text = text[: len(text) - partial_stop_length(text, self.stops + tuple(t for t, _ in SHOWN_TAGS))]
        now = shown(text, self.opened)
        if now.startswith(self.printed):
            if now != self.printed:
                self._start()
            sys.stdout.write(now[len(self.printed):])
            sys.stdout.flush()
            self.printed = now

    def _start(self) -> None:
        """Before the reply's first characters: its heading (in a batch); compile messages then wait for the
        reply's end (they would land inside it)."""
        COMPILE_MESSAGES.hold()
        if self.heading:
            sys.stdout.write(self.heading)
            self.heading = ""

    def finish(self, final_text: str | None) -> None:
        """Prints what is left of the final text (``GenerationOutput.text``) and ends the line."""
        if self.tokenizer is not None and final_text is not None:
            self._write(final_text, final=True)
        if self.heading:  # nothing was streamed
            sys.stdout.write(self.heading)
        sys.stdout.write("\n")
        sys.stdout.flush()
        COMPILE_MESSAGES.release()

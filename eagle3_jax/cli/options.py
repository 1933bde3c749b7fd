"""Option types, shared option groups and helpers of the ``eagle3-jax`` subcommands."""

from __future__ import annotations

import argparse
import sys

from eagle3_jax.validation import MAX_SEED

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3  # a bug: an exception the project did not anticipate

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when it is None or False, nor when the help already names it, nor for
    a switch (``--no-check-finite``'s default, True, is the value of what it turns off: it would read backwards)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS \
                or "default" in text or not text or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def add_renamed(p, old: str, new: str) -> None:
    """A hidden option ``old`` that was renamed: using it (with a value or not) is a usage error naming ``new``."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{old} is now {new}")

    p.add_argument(old, nargs="?", action=Renamed, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def int_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def int_type(what: str, minimum: int, maximum: int | None = None):
    """An argparse type for integers in [minimum, maximum], described as ``what`` in its errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_type("a positive integer", 1)


non_negative_int = int_type("a non-negative integer", 0)


seed_type = int_type(f"an integer seed in [0, {MAX_SEED}]", 0, MAX_SEED)


def finite_float(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def knob_triple(text: str) -> tuple[int, int, int]:
    try:
        d, k, n = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected num_steps,topk,num_draft_tokens (e.g. 3,1,4), got {text!r}") from None
    return d, k, n


def bench_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def add_sampling_options(p) -> None:
    """--temperature, --top-p, --top-k and --seed: the sampling knobs of every generating command."""
    p.add_argument("--temperature", type=finite_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 means greedy decoding")
    p.add_argument("--top-p", type=finite_float, default=1.0, metavar="P", help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=non_negative_int, default=0, metavar="K",
                   help="sample among the K most likely tokens (0 = off)")
    p.add_argument("--seed", type=seed_type, default=0, metavar="S", help="PRNG seed for sampling (0 to 2**32-1)")


# eagle3_jax.attention.BACKENDS' names and "auto", as text: the parser imports no JAX (a test keeps them equal).
ATTENTION_CHOICES = ("auto", "blockwise", "pallas_gpu", "pallas_tpu", "reference")


def add_runtime_options(p) -> None:
    """--max-cache-len, --dtype, --attention and --no-check-finite."""
    p.add_argument("--max-cache-len", type=positive_int, default=None, metavar="S",
                   help="KV cache slots per prompt (default: prompt bucket + max-new-tokens, rounded up to a "
                        "cache bucket: 128 x 1, 2, 3, 4, 6, 8, 12, ...)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="parameter/activation dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto",
                   help="attention backend (auto: pallas_gpu on GPUs of compute capability 8.0 and newer, "
                        "pallas_tpu on TPU, blockwise elsewhere; all cost the live length, not the cache's "
                        "capacity; reference scores every slot, the definition for tests)")
    p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                   help="load weights that hold NaN or Inf instead of refusing them (generation still stops a row "
                        "on non-finite logits, with finish_reason 'nonfinite')")


def add_mesh_options(p, *, data_parallel: bool = True, distributed: bool = True,
                     data_help: str = "split each batch's prompts over M groups of devices (a batch is padded to a "
                                      "multiple of M); uses M x N devices in all") -> None:
    """--tensor-parallel, --data-parallel and (``distributed``) the multi-host options
    (docs/architecture.md#device-mesh)."""
    g = p.add_argument_group("devices (a mesh: docs/architecture.md#device-mesh)")
    g.add_argument("--tensor-parallel", type=positive_int, default=1, metavar="N",
                   help="split the target's attention heads, MLP and KV cache over N devices (N must divide the "
                        "attention heads; KV heads it does not divide are replicated, with a warning)")
    if data_parallel:
        g.add_argument("--data-parallel", type=positive_int, default=1, metavar="M", help=data_help)
    if not distributed:
        return
    g.add_argument("--distributed", action="store_true",
                   help="several processes, one mesh: call jax.distributed.initialize() first; every host runs "
                        "the same command, process 0 prints and writes (auto-detected on TPU pods, SLURM and "
                        "Open MPI; elsewhere give the three options below)")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help="with --distributed: process 0's address, reachable from every process")
    g.add_argument("--num-processes", type=positive_int, default=None, metavar="P", help="with --distributed")
    g.add_argument("--process-id", type=non_negative_int, default=None, metavar="I",
                   help="with --distributed: this process's index in [0, P)")
    g.add_argument("--distributed-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="with --distributed: how long the processes wait for each other to start (then one error "
                        "line naming the coordinator and the missing processes)")


def start_distributed(args) -> None:
    """Runs ``jax.distributed.initialize()`` for --distributed (before anything touches a device)."""
    if not getattr(args, "distributed", False):
        if any(getattr(args, k, None) is not None for k in ("coordinator", "num_processes", "process_id")):
            raise usage("--coordinator/--num-processes/--process-id need --distributed")
        return
    from eagle3_jax.distributed import initialize

    initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.distributed_timeout)


def mesh_from_args(args, target_config=None):
    """The device mesh of --tensor-parallel/--data-parallel (None for one device of one process), checked
    against the target's config when given (before any weights load)."""
    tp, dp = args.tensor_parallel, getattr(args, "data_parallel", 1)
    if tp * dp == 1 and not getattr(args, "distributed", False):
        return None
    from eagle3_jax.sharding import ShardingPlan, make_mesh

    if getattr(args, "distributed", False):
        import jax

        if tp * dp != jax.device_count():
            raise usage(f"--distributed: the mesh must span every process's devices: --tensor-parallel x "
                        f"--data-parallel = {tp * dp}, but the {jax.process_count()} processes have "
                        f"{jax.device_count()} devices")
    mesh = make_mesh(tp, dp)
    if target_config is not None:
        ShardingPlan.for_target(mesh, target_config)  # refuses heads the tensor axis does not divide
    return mesh


def is_main_process() -> bool:
    """Whether this process prints and writes (process 0 of a --distributed run; always True otherwise)."""
    if "jax" not in sys.modules:
        return True
    from eagle3_jax.distributed import is_main_process as main

    return main()


def add_tree_options(p) -> None:
    """--num-steps, --tree-topk, --num-draft-tokens: the static tree shape (SGLang's knobs; --tree-topk is
    SGLang's --speculative-eagle-topk, named so that it can not be taken for sampling's --top-k)."""
    p.add_argument("--num-steps", type=positive_int, default=None, metavar="D",
                   help="tree depth: draft steps per cycle (default 3)")
    p.add_argument("--tree-topk", dest="topk", type=positive_int, default=None, metavar="K",
                   help="the tree's width: children kept per tree node and beam width (default 1: a chain); "
                        "sampling's top-k is --top-k")
    add_renamed(p, "--topk", "--tree-topk K (the tree's width; sampling's top-k is --top-k)")
    p.add_argument("--num-draft-tokens", type=positive_int, default=None, metavar="N",
                   help="tree tokens verified per cycle, root included (default D+1 for a chain; required for K>1)")


def add_head_overrides(p) -> None:
    """--draft-rope-theta and --feature-layers: the pitfalls of published heads."""
    p.add_argument("--draft-rope-theta", type=finite_float, default=None, metavar="THETA",
                   help="use plain RoPE with this base for the head, dropping any scaling in its config "
                        "(some published heads were trained with 10000)")
    p.add_argument("--feature-layers", type=int_list, default=None, metavar="L1,L2,L3",
                   help="override the target layers feeding the head (HF hidden_states indices, e.g. 2,18,33)")


def head_overrides(args) -> dict:
    """--draft-rope-theta and --feature-layers as the keyword arguments of ``with_overrides``/``load_draft``."""
    return dict(rope_theta=args.draft_rope_theta,
                feature_layers=tuple(args.feature_layers) if args.feature_layers else None)


def check_configs(target: str, draft: str | None = None, **overrides):
    """Resolves and checks the target's (and the head's) config.json before any tokenizer or weights are read.

    Returns (target dir, target config, draft dir, draft config).
    """
    from eagle3_jax.hf_heads import read_eagle3_config
    from eagle3_jax.hub import resolve_model_dir
    from eagle3_jax.models.registry import read_target_config

    target_dir = resolve_model_dir(target)
    target_config = read_target_config(target_dir)
    draft_dir = draft_config = None
    if draft is not None:
        draft_dir = resolve_model_dir(draft, draft=True)
        draft_config = read_eagle3_config(draft_dir).with_overrides(**overrides)
        draft_config.check_target(target_config, where=f"draft head {draft_dir}")
    return target_dir, target_config, draft_dir, draft_config


def load_tokenizer(model_dir: str, required: bool):
    """The model directory's tokenizer; None when it has none and ``required`` is off.

    A tokenizer that fails to load is an error when it is required (text
    prompts), else a warning: token ids are printed instead of text.
    """
    from eagle3_jax.errors import InputError
    from eagle3_jax.text import has_tokenizer_files
    from eagle3_jax.text import load_tokenizer as load

    if not has_tokenizer_files(model_dir):
        if required:
            raise InputError(f"{model_dir} has no tokenizer files; pass --prompt-ids instead of --prompt")
        return None
    try:
        return load(model_dir)
    except InputError as e:
        if required:
            raise InputError(f"{e}; fix them, or pass --prompt-ids instead of --prompt") from None
        print(f"warning: {e}; printing token ids instead of text", file=sys.stderr)
        return None


def check_text(text: str, what: str) -> str:
    """Text from the command line must be valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    from eagle3_jax.errors import InputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable byte at position {e.start})") from None
    return text


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    from eagle3_jax.errors import InputError
    from eagle3_jax.text import render_chat, token_ids

    check_text(text, "--prompt")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: the tokenizer has no chat template")
        text = render_chat(tokenizer, [{"role": "user", "content": text}], where="--chat")
    return token_ids(tokenizer, text, where="--prompt")




def check_tree(steps, topk, num_draft_tokens):
    """The tree shape from --num-steps/--tree-topk/--num-draft-tokens (None: not given), with the library's defaults."""
    from eagle3_jax.decoding.tree import NumDraftTokensRequired, TreeSpec

    try:
        return TreeSpec.resolve(steps, topk, num_draft_tokens)
    except NumDraftTokensRequired:
        raise usage("--num-draft-tokens is required with --tree-topk > 1") from None


def draft_tree(args):
    """The tree shape of a command with --draft, the tree options and the head overrides: None without
    --draft (where any of those options is a usage error), else :func:`check_tree`'s."""
    knobs = (args.num_steps, args.topk, args.num_draft_tokens, args.draft_rope_theta, args.feature_layers)
    if args.draft is None:
        if any(k is not None for k in knobs):
            raise usage("--num-steps/--tree-topk/--num-draft-tokens/--draft-rope-theta/--feature-layers need --draft")
        return None
    return check_tree(args.num_steps, args.topk, args.num_draft_tokens)


class UsageError(Exception):
    pass


def usage(message: str) -> UsageError:
    return UsageError(message)


class CompileMessages:
    """Prints 'compiling the speculative loop (...)... done in 12.3 s' on stderr, one line per compilation.

    While a reply is being streamed on stdout (:meth:`hold`), the messages wait and are printed when it ends
    (:meth:`release`), so that none lands inside the streamed text of a terminal.
    """

    def __init__(self):
        self.open = False
        self.held: list | None = None

    def __call__(self, event) -> None:
        if not is_main_process():  # the other processes of a --distributed run compile the same programs
            return
        if self.held is not None:
            self.held.append(event)
            return
        if not event.done:
            self.end_line()
            sys.stderr.write(f"compiling {event.what}... ")
            self.open = True
        else:
            if not self.open:
                sys.stderr.write(f"{event.what}: ")
            how = "loaded from the compilation cache" if event.from_cache else "done"
            sys.stderr.write(f"{how} in {event.seconds:.1f} s\n")
            self.open = False
        sys.stderr.flush()

    def hold(self) -> None:
        """Keeps the messages back until :meth:`release` (a reply is being streamed on stdout)."""
        if self.held is None:
            self.end_line()
            self.held = []

    def release(self) -> None:
        """Prints the messages held back."""
        held, self.held = self.held or [], None
        for event in held:
            self(event)

    def end_line(self) -> None:
        """Ends a 'compiling ...' line left open (by an error, or an interruption)."""
        if self.open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.open = False


COMPILE_MESSAGES = CompileMessages()


def end_progress_lines() -> None:
    """Closes progress bars still on screen, so that an error message starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    bars = list(getattr(tqdm, "_instances", []))
    for bar in bars:
        bar.close()
    if bars:
        sys.stderr.write("\n")

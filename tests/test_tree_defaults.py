"""The default tree shapes live in one place (eagle3_jax.decoding.tree) and every entry point resolves them there."""

from __future__ import annotations

import pytest

from eagle3_jax.cli import build_parser
from eagle3_jax.cli.options import UsageError, check_tree
from eagle3_jax.decoding.tree import DEFAULT_TREE, DEMO_TREE, WIDE_TREE, NumDraftTokensRequired, TreeSpec
from eagle3_jax.errors import InputError


@pytest.mark.parametrize("given, default, expected", [
    ((None, None, None), DEFAULT_TREE, DEFAULT_TREE),
    ((None, None, None), DEMO_TREE, DEMO_TREE),
    ((None, None, None), WIDE_TREE, WIDE_TREE),
    ((5, None, None), DEFAULT_TREE, (5, 1, 6)),      # a chain: N = D + 1
    ((None, 1, None), DEFAULT_TREE, (3, 1, 4)),
    ((None, 2, 6), DEFAULT_TREE, (3, 2, 6)),         # D from the default
    ((2, None, None), DEMO_TREE, (2, 1, 3)),
    ((4, 2, 8), DEMO_TREE, (4, 2, 8)),               # everything given: the default plays no part
])
def test_resolve(given, default, expected):
    assert TreeSpec.resolve(*given, default=default).knobs == expected


def test_library_defaults():
    assert DEFAULT_TREE == (3, 1, 4) and DEMO_TREE == (4, 1, 5) and WIDE_TREE == (7, 10, 60)
    assert TreeSpec.resolve() == TreeSpec(*DEFAULT_TREE)


def test_a_tree_needs_num_draft_tokens():
    with pytest.raises(NumDraftTokensRequired, match="num_draft_tokens is required when topk > 1"):
        TreeSpec.resolve(topk=2)
    assert issubclass(NumDraftTokensRequired, InputError)


def test_resolve_checks_the_shape():
    with pytest.raises(InputError, match="num_draft_tokens must be num_steps \\+ 1 = 4"):
        TreeSpec.resolve(3, 1, 7)
    with pytest.raises(InputError, match="num_steps must be a positive integer"):
        TreeSpec.resolve(0, 2, 4)


def test_the_command_line_resolves_with_the_library_default():
    assert check_tree(None, None, None) == TreeSpec(*DEFAULT_TREE)
    assert check_tree(6, None, None).knobs == (6, 1, 7)
    with pytest.raises(UsageError, match="--num-draft-tokens is required with --tree-topk > 1"):
        check_tree(None, 2, None)


def _help(command: str, option: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).help


def test_help_texts_name_the_defaults():
    # The parser imports nothing heavy, so its help repeats the defaults as text; they must agree.
    d, k, _ = DEFAULT_TREE
    assert f"(default {d})" in _help("generate", "--num-steps")
    assert f"(default {k}: a chain)" in _help("generate", "--tree-topk")
    assert f"(default {d})" in _help("regenerate", "--num-steps")
    from eagle3_jax.demo.run import DEFAULT_KNOBS

    assert DEFAULT_KNOBS == {"smollm2": DEFAULT_TREE, "toy": DEMO_TREE}
    assert "(default {},{},{}; the toy pair {},{},{})".format(*DEFAULT_TREE, *DEMO_TREE) in _help("demo", "--knobs")
    assert "(default: {},{},{} {},{},{})".format(*DEFAULT_TREE, *WIDE_TREE) in _help("eval", "--knobs")


def test_attention_choices_are_the_registered_backends():
    from eagle3_jax.attention import BACKENDS
    from eagle3_jax.cli.options import ATTENTION_CHOICES

    assert list(ATTENTION_CHOICES) == ["auto", *sorted(BACKENDS)]


def test_building_the_parser_imports_no_jax():
    import subprocess
    import sys

    code = "import sys; from eagle3_jax.cli import build_parser; build_parser(); print('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_the_tree_width_can_not_be_taken_for_sampling_top_k(capsys):
    """--tree-topk is the tree's width, --top-k sampling's; the old --topk is refused, naming the new one."""
    parser = build_parser()
    args = parser.parse_args(["generate", "--target", "T", "--prompt-ids", "1", "--tree-topk", "4", "--top-k", "20"])
    assert (args.topk, args.top_k) == (4, 20)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["generate", "--target", "T", "--prompt-ids", "1", "--topk", "4"])
    assert exit_.value.code == 2 and "--topk is now --tree-topk" in capsys.readouterr().err
    for argv in (["convert", "--draft", "SRC", "DST"], ["convert", "SRC", "DST", "--draft"]):  # --draft DIR elsewhere
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(argv)
        assert exit_.value.code == 2 and "--draft is now --head" in capsys.readouterr().err
    assert parser.parse_args(["convert", "--head", "SRC", "DST"]).head


def test_a_switch_help_does_not_show_the_default_it_turns_off(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    switch = text[text.index("--no-check-finite load weights"):]
    switch = switch[: switch.index(" --", 3)]
    assert "default" not in switch, switch
    assert "--max-cache-len" in text and "(default: auto)" in text  # other options still show theirs

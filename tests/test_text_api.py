"""Text in, text out: text prompts, chat messages, decoded outputs, thinking splits and stop strings."""

import dataclasses

import numpy as np
import pytest
from spec_helpers import random_head, tiny_target

from eagle3_jax import Generator, InputError, load_target
from eagle3_jax.generation import GenerationOutput, batch_summary
from eagle3_jax.text import (
    covering_prefix,
    cut_at_stop,
    find_stop,
    opens_thinking,
    partial_stop_length,
    reasoning_and_answer,
    split_thinking,
)

EOS = 5  # tiny_target's eos id
N = 24  # max_new_tokens of every tiny-target call, and
REAL_N = 8  # of every call to the real-vocabulary target: one compiled program per batch size
PROMPTS = [[7, 8, 9], [20, 21], [33, 34, 35, 36]]


class WordTokenizer:
    """A tokenizer for the 97-token tiny targets: id i is the word "w{i} ", except the ids given other pieces.

    Decoding is exact and additive, so expected texts and cuts can be computed by hand.
    """

    chat_template = None

    def __init__(self, pieces: dict[int, str] | None = None):
        self.pieces = {i: f"w{i} " for i in range(97)}
        self.pieces[EOS] = "<eos>"
        self.pieces.update(pieces or {})

    def __call__(self, text, add_special_tokens=False):
        words = {p: i for i, p in self.pieces.items()}
        return {"input_ids": [words[w + " "] for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (skip_special_tokens and i == EOS) else self.pieces[int(i)] for i in ids)


@pytest.fixture(scope="module")
def tiny():
    return tiny_target()


@pytest.fixture(scope="module")
def real(hf_qwen3_real_vocab):
    """A tiny random Qwen3 with the real Qwen3 tokenizer and chat template in its directory."""
    from transformers import AutoTokenizer

    target = load_target(hf_qwen3_real_vocab.path, dtype="float32", progress=False)
    return target, AutoTokenizer.from_pretrained(hf_qwen3_real_vocab.path)


def _free_runs(gen, prompts, **kwargs):
    return gen.generate(prompts, max_new_tokens=N, stop_token_ids=(), **kwargs)


# ---------------------------------------------------------------- text in

def test_text_prompt_equals_its_token_ids(real):
    target, tok = real
    gen = Generator(target)
    [by_text] = gen.generate("Hello there, world", max_new_tokens=REAL_N, stop_token_ids=())
    ids = tok("Hello there, world", add_special_tokens=False)["input_ids"]
    [by_ids] = gen.generate(ids, max_new_tokens=REAL_N, stop_token_ids=())
    assert by_text.token_ids == by_ids.token_ids and by_text.prompt_length == len(ids)
    assert by_text.text == by_ids.text == tok.decode(by_ids.token_ids, skip_special_tokens=True)


def test_chat_prompt_equals_apply_chat_template(real):
    target, tok = real
    gen = Generator(target)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    for kwargs in ({}, {"enable_thinking": False}):
        ids = list(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, **kwargs)["input_ids"])
        [by_chat] = gen.generate(chat, max_new_tokens=REAL_N, stop_token_ids=(), chat_template_kwargs=kwargs or None)
        [by_ids] = gen.generate(ids, max_new_tokens=REAL_N, stop_token_ids=())
        assert by_chat.prompt_length == len(ids) and by_chat.token_ids == by_ids.token_ids


@pytest.mark.slow
def test_mixed_batch_and_single_prompts(real):
    target, tok = real
    gen = Generator(target)
    chat = [{"role": "user", "content": "Hi"}]
    ids = tok("Plain ids", add_special_tokens=False)["input_ids"]
    batch = gen.generate(["A text prompt", chat, ids], max_new_tokens=REAL_N, stop_token_ids=())
    singles = [gen.generate(p, max_new_tokens=REAL_N, stop_token_ids=()) for p in ("A text prompt", chat, ids)]
    assert all(len(s) == 1 for s in singles)
    assert [o.token_ids for o in batch] == [s[0].token_ids for s in singles]


@pytest.mark.slow
def test_target_tokenizer_is_loaded_lazily_and_only_with_files(real, hf_qwen3, tiny):
    target, _ = real
    gen = Generator(target)
    assert gen.tokenizers.directory is not None and gen.tokenizers._value is gen.tokenizers._UNSET
    [out] = gen.generate([7, 8, 9], max_new_tokens=REAL_N, stop_token_ids=())
    assert isinstance(out.text, str)  # the directory has a tokenizer: id prompts get text too
    [out] = Generator(target, tokenizer=False).generate([7, 8, 9], max_new_tokens=REAL_N, stop_token_ids=())
    assert out.text is None and out.reasoning is None and out.answer is None
    no_files = Generator(load_target(hf_qwen3.path, dtype="float32", progress=False))
    assert no_files.tokenizers.get() is None  # what generate asks for outputs: no text, and no error
    [out] = _free_runs(Generator(tiny), [7, 8, 9])  # built in code: no directory
    assert out.text is None


@pytest.mark.slow
def test_explicit_tokenizer_path_or_object(real, hf_qwen3_real_vocab, tiny):
    target, tok = real
    by_path = Generator(target, tokenizer=hf_qwen3_real_vocab.path).generate("Hi", max_new_tokens=REAL_N)
    by_object = Generator(target, tokenizer=tok).generate("Hi", max_new_tokens=REAL_N)
    assert by_path[0].token_ids == by_object[0].token_ids
    [out] = _free_runs(Generator(tiny, tokenizer=WordTokenizer()), "w7 w8 w9")
    assert out.prompt_length == 3 and out.text == WordTokenizer().decode(out.token_ids)


# --------------------------------------------------------------- text out

def test_text_leaves_out_a_final_stop_token(tiny):
    words = WordTokenizer()
    gen = Generator(tiny, tokenizer=words)
    [free] = _free_runs(gen, [7, 8, 9])
    stop_id = free.token_ids[3]
    [out] = gen.generate([7, 8, 9], max_new_tokens=N, stop_token_ids=[stop_id])
    assert out.finish_reason == "eos" and out.token_ids[-1] == stop_id
    assert out.text == words.decode(out.token_ids[:-1]) and words.pieces[stop_id] not in out.text


@pytest.mark.slow
def test_outputs_json_has_text_and_batch_fields_apart(tiny):
    outs = _free_runs(Generator(tiny, tokenizer=WordTokenizer()), PROMPTS)
    row = outs[0].to_json()
    assert {"text", "reasoning", "answer", "prefill_seconds"} <= set(row)
    slim = outs[0].to_json(batch_fields=False)
    assert not set(GenerationOutput.BATCH_FIELDS) & set(slim) and slim["text"] == outs[0].text
    batch = batch_summary(outs)
    assert batch["prompts"] == 3 and batch["generated_tokens"] == sum(len(o.token_ids) for o in outs)
    assert batch["prefill_seconds"] == outs[1].prefill_seconds


@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nsteps\n</think>\n\n42", False, ("steps", "42")),
    ("steps</think>\n\n42 ", True, ("steps", "42")),  # Qwen3-Thinking-2507: the template opened <think>
    ("steps</think>42", False, ("steps", "42")),
    ("</think>42", False, ("", "42")),
    ("just an answer ", False, (None, "just an answer")),
    ("thinking, cut short", True, ("thinking, cut short", "")),
    ("<think>\nhybrid Qwen3 opened it, cut short", False, ("hybrid Qwen3 opened it, cut short", "")),
    ("", False, (None, "")),
])
def test_reasoning_and_answer(text, opened, expected):
    assert reasoning_and_answer(text, opened) == expected


def test_split_thinking_and_opens_thinking():
    from eagle3_jax.notebook import split_thinking as from_notebook

    assert from_notebook is split_thinking
    assert split_thinking("<think>\nsteps\n</think>\n\n42") == ("steps", "42")
    assert split_thinking("just an answer ") == ("", "just an answer")
    assert opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not opens_thinking("<|im_start|>assistant\n")


def test_thinking_split_end_to_end(tiny):
    """A tokenizer that reads the target's 4th generated token as </think> (and prompt id 50 as <think>)."""
    gen = Generator(tiny, tokenizer=WordTokenizer())
    [free] = _free_runs(gen, [7, 8, 9])
    ids = free.token_ids
    if ids[3] in ids[:3]:
        pytest.skip("the 4th token also occurs earlier")
    words = WordTokenizer({ids[3]: "</think>"})
    [out] = _free_runs(Generator(tiny, tokenizer=words), [7, 8, 9])
    assert out.text == words.decode(ids) and out.token_ids == ids
    assert out.reasoning == words.decode(ids[:3]).strip() and out.answer == words.decode(ids[4:]).strip()
    opening = WordTokenizer({50: "<think>"})  # the prompt opens <think>, the reply never closes it
    [short] = _free_runs(Generator(tiny, tokenizer=opening), [7, 8, 50])
    assert (short.reasoning, short.answer) == (short.text.replace("<think>", "").strip(), "")
    closing = WordTokenizer({50: "<think>", 51: "</think>"})
    [closed] = _free_runs(Generator(tiny, tokenizer=closing), [7, 50, 51])  # <think></think> in the prompt
    if "</think>" not in closed.text:
        assert closed.reasoning is None and closed.answer == closed.text.strip()


# ----------------------------------------------------------- stop strings

def test_stop_string_helpers():
    assert find_stop("a\n\nb Observation: c", ["Observation:", "\n\n"]) == (1, "\n\n")
    assert find_stop("abcd", ["bc", "bcd"]) == (1, "bcd")
    assert find_stop("abc", ["x"]) is None
    assert cut_at_stop("answer\n\nmore", ["\n\n"]) == "answer"
    assert cut_at_stop("answer\n\nmore", ["\n\n"], include=True) == "answer\n\n"
    assert partial_stop_length("text Obser", ["Observation:"]) == 5
    assert partial_stop_length("text\n", ["\n\n"]) == 1 and partial_stop_length("text", ["\n\n"]) == 0
    pieces = ["ab", "c", "de", "f"]

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    assert covering_prefix(decode, [0, 1, 2, 3], "abcd") == 3
    assert covering_prefix(decode, [0, 1, 2, 3], "abc") == 2
    assert covering_prefix(decode, [0, 1, 2, 3], "") == 0


def _check_stopped(words, free, out, stop, include=False):
    """``out`` is ``free`` cut at the first occurrence of ``stop`` in its text, token ids covering the text."""
    full = words.decode(free.token_ids)
    if stop not in full:
        assert out.token_ids == free.token_ids and out.finish_reason == free.finish_reason
        return False
    cut = full[: full.index(stop) + (len(stop) if include else 0)]
    assert out.finish_reason == "stop" and out.text == cut
    k = len(out.token_ids)
    assert out.token_ids == free.token_ids[:k]
    assert words.decode(out.token_ids).startswith(cut) and not words.decode(out.token_ids[: k - 1]).startswith(cut) \
        or k == 0
    return True


@pytest.mark.parametrize("draft", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_stop_strings_cut_and_stop_early(tiny, draft):
    """Greedy: each row is the unstopped row cut at its first stop string; the loop ends early."""
    words = WordTokenizer()
    head = random_head(tiny) if draft else None
    gen = Generator(tiny, head, tokenizer=words)
    prompts = PROMPTS
    free = _free_runs(gen, prompts)
    first = words.decode(free[0].token_ids[6:7])  # a whole word of row 0
    across = words.decode(free[1].token_ids[4:6])[2:5]  # the end of one word and the start of the next, row 1
    for stops in ([first], [first, across]):
        outs = gen.generate(prompts, max_new_tokens=N, stop_token_ids=(), stop=stops, stream_every=2)
        for f, o in zip(free, outs):
            full = words.decode(f.token_ids)
            hit = find_stop(full, stops)
            if hit is None:
                assert o.token_ids == f.token_ids
                continue
            assert _check_stopped(words, f, o, hit[1])
        assert outs[0].finish_reason == "stop" and outs[0].num_target_forwards < free[0].num_target_forwards
    assert outs[1].finish_reason == "stop" and words.decode(outs[1].token_ids) != outs[1].text  # runs one token past
    inc = gen.generate(prompts, max_new_tokens=N, stop_token_ids=(), stop=first, include_stop_str_in_output=True)[0]
    assert _check_stopped(words, free[0], inc, first, include=True) and inc.text.endswith(first)
    if draft:  # speculative greedy with stop strings equals plain greedy with stop strings
        plain = Generator(tiny, tokenizer=words).generate(prompts, max_new_tokens=N, stop_token_ids=(), stop=[first])
        spec = gen.generate(prompts, max_new_tokens=N, stop_token_ids=(), stop=[first])
        assert [(o.token_ids, o.text) for o in plain] == [(o.token_ids, o.text) for o in spec]


def test_stop_strings_do_not_recompile_and_stream_the_kept_tokens(tiny):
    words = WordTokenizer()
    gen = Generator(tiny, tokenizer=words)
    [free] = _free_runs(gen, [[7, 8, 9]])
    before = gen.num_compiles
    stop = words.decode(free.token_ids[9:10])
    streamed = []
    [out] = gen.generate([[7, 8, 9]], max_new_tokens=N, stop_token_ids=(), stop=stop,
                         stream=lambda row, ids: streamed.extend(ids))
    assert gen.num_compiles == before
    assert _check_stopped(words, free, out, stop) and streamed == out.token_ids


def test_stop_string_in_the_first_token(tiny):
    words = WordTokenizer()
    gen = Generator(tiny, tokenizer=words)
    [free] = _free_runs(gen, [[7, 8, 9]])
    [out] = gen.generate([[7, 8, 9]], max_new_tokens=N, stop_token_ids=(), stop=words.decode(free.token_ids[:1]))
    assert out.finish_reason == "stop" and out.text == "" and out.token_ids == []
    assert out.num_target_forwards == 0


def test_stop_strings_with_the_real_tokenizer(real):
    target, tok = real
    gen = Generator(target)
    [free] = gen.generate("Once upon a time", max_new_tokens=REAL_N, stop_token_ids=())
    text = free.text
    if len(text) < 8:
        pytest.skip("the random model's text is too short")
    stop = text[len(text) // 2: len(text) // 2 + 2]
    [out] = gen.generate("Once upon a time", max_new_tokens=REAL_N, stop_token_ids=(), stop=[stop])
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert out.token_ids == free.token_ids[: len(out.token_ids)]
    assert tok.decode(out.token_ids, skip_special_tokens=True).startswith(out.text)


# ------------------------------------------------------------------ errors

def test_text_without_a_tokenizer_is_an_error(tiny, hf_qwen3):
    for gen in (Generator(tiny), Generator(tiny, tokenizer=False),
                Generator(load_target(hf_qwen3.path, dtype="float32", progress=False))):
        with pytest.raises(InputError, match=r"prompt 0 \(text\) needs a tokenizer"):
            gen.generate("hello", max_new_tokens=2)
        with pytest.raises(InputError, match=r"prompt 1 \(a list of chat messages\) needs a tokenizer"):
            gen.generate([[7, 8], [{"role": "user", "content": "hi"}]], max_new_tokens=2)
        with pytest.raises(InputError, match=r"stop \(stop strings\) needs a tokenizer"):
            gen.generate([[7, 8]], max_new_tokens=2, stop="\n")


def test_messages_without_a_chat_template_is_an_error(tiny):
    from eagle3_jax.demo import demo_paths
    from eagle3_jax.text import load_tokenizer

    demo_tokenizer = load_tokenizer(demo_paths("toy")[0])  # the demo target's tokenizer has no chat template
    for tokenizer in (WordTokenizer(), demo_tokenizer):
        with pytest.raises(InputError, match="prompt 0 is a list of chat messages, but the tokenizer has no chat "
                                             "template"):
            Generator(tiny, tokenizer=tokenizer).generate([{"role": "user", "content": "hi"}], max_new_tokens=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop=5), "stop must be a string or a list of strings, got int"),
    (dict(stop=[1]), "stop must be a string or a list of strings, got an item 1"),
    (dict(stop=b"x"), "stop must be a string or a list of strings, got bytes"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(stop={"a": 1}), "stop must be a string or a list of strings, got dict"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be True or False"),
    (dict(chat_template_kwargs=["enable_thinking"]), "chat_template_kwargs must be a dict"),
    (dict(chat_template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs can not set add_"),
    (dict(chat_template_kwargs={"where": "x", "tokenize": True}), "can not set tokenize, where"),
])
def test_bad_text_arguments(tiny, kwargs, message):
    with pytest.raises(InputError, match=message):
        Generator(tiny, tokenizer=WordTokenizer()).generate([[7, 8]], max_new_tokens=2, **kwargs)


def test_bad_tokenizers_and_messages(real, tiny, tmp_path):
    target, _ = real
    with pytest.raises(InputError, match="tokenizer must be None"):
        Generator(tiny, tokenizer=42)
    with pytest.raises(InputError, match="the tokenizer could not be loaded"):
        Generator(tiny, tokenizer=str(tmp_path))
    with pytest.raises(InputError, match="prompt 0, message 1: needs a string 'role'"):
        Generator(target).generate([{"role": "user", "content": "hi"}, {"content": "no role"}], max_new_tokens=2)
    with pytest.raises(InputError, match="prompt 0 is empty"):
        Generator(target).generate("", max_new_tokens=2)


def test_output_dataclass_keeps_positional_fields():
    """The text fields come last, with defaults, so code that builds outputs keeps working."""
    names = [f.name for f in dataclasses.fields(GenerationOutput)]
    assert names[-3:] == ["text", "reasoning", "answer"] and names[0] == "token_ids"
    assert np.isclose(GenerationOutput([1], "eos", 0, [], 1.0, 3, 0.1, 0.1, 0.0, 5.0).tokens_per_second, 5.0)


def test_stream_text_yields_the_final_text_in_deltas(tiny):
    """Generator.stream_text: text deltas whose concatenation is generate()'s text, held back at a stop string."""
    words = WordTokenizer()
    gen = Generator(tiny, tokenizer=words)
    [free] = _free_runs(gen, [[7, 8, 9]])
    deltas = list(gen.stream_text([7, 8, 9], max_new_tokens=N, stop_token_ids=(), stream_every=2))
    assert len(deltas) > 1 and "".join(deltas) == free.text
    stop = words.decode(free.token_ids[5:6])
    [stopped] = gen.generate([7, 8, 9], max_new_tokens=N, stop_token_ids=(), stop=stop)
    deltas = list(gen.stream_text([7, 8, 9], max_new_tokens=N, stop_token_ids=(), stop=stop, stream_every=2))
    assert "".join(deltas) == stopped.text and stop not in "".join(deltas)
    with pytest.raises(InputError, match="stream_text takes one prompt"):
        next(gen.stream_text([[7, 8], [9, 10]]))
    with pytest.raises(InputError, match="max_new_tokens must be at least 1"):  # raised in the caller's thread
        list(gen.stream_text([7, 8, 9], max_new_tokens=0))

"""Streaming text input for the realtime model (realtime.md §6): the ids streamed from text pieces are always a prefix
of the whole text's, end equal to them whatever the piece boundaries, and the window loop fed from pieces gives the
whole-text run's audio bit for bit, starting before the text has ended.

Two tokenizers: the committed tiny Qwen2-style one (8 merges) and one trained here with the same normalizer and
pre-tokenizer on sentences like those the tests use, so that whole words and final punctuation with its newline
("...\\n", "?\\n") are single ids as in Qwen2.5.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import Tokenizer, pre_tokenizers, trainers

from vibevoice_mlx.errors import UserError
from vibevoice_mlx.models.realtime import TEXT_WINDOW
from vibevoice_mlx.testing import REALTIME_TINY as DATA, realtime_tiny
from vibevoice_mlx.text_stream import TextStream, clean, plain_tokenizer, text_ids, text_source
from vibevoice_mlx.windows import windows

TINY = Tokenizer.from_file(str(DATA / "tokenizer" / "tokenizer.json"))
ADDED = [t.content for t in TINY.get_added_tokens_decoder().values()]
SENTENCES = ["Hello world.", "Wait...", "Hi!", "Why?", "The winner wins, don't you think?",
             "I'll pay 1,000 dollars; we're 3.14 off.", "你好。日本語，한국어", "café naïve résumé…", "Ok 😀 👍🏽 great!!"]


def _trained() -> Tokenizer:
    tok = Tokenizer.from_str(plain_tokenizer(TINY).to_str())  # a copy: training replaces the model in place
    corpus = [s + end for s in SENTENCES for end in ("\n", " ", "  \n", "\r\n", "\t")] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(ADDED)
    return tok


TOKENIZERS = {"tiny": TINY, "trained": _trained()}

# Fragments the rule of §6.2 is about: contractions, numbers, ellipses, final punctuation, trailing and odd
# whitespace (NBSP, ideographic space, tabs, CR-LF, separators Python strips but the regex does not split on),
# combining accents in and out of canonical order, emoji with modifiers and joiners, CJK, curly quotes, and
# added-token strings whole and in part.
FRAGMENTS = SENTENCES + [
    " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x1c", "\u0085", "\u2028", "'s", "'ll", "don't", "42", "3.14",
    "...", "…", ".", ",", "!", "?", "!!", "e\u0301", "\u0301", "\u0315", "\u0323", "\u1100\u1161", "\u11a8",
    "👨\u200d👩\u200d👧", "日本", "。", "’", "“", "”", "<|image_pad|>", "<|im_end|>", "<|", "|>", "<tool_call>"]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=20).map("".join)


def _cut(seq, cuts):
    bounds = [0, *sorted(set(cuts)), len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:])]


def _streamed(tok, pieces, whole):
    """Feed `pieces`, checking after each that the final ids are a prefix of `whole`; the ids after close."""
    stream = TextStream(tok)
    for piece in pieces:
        stream.feed(piece)
        assert stream.ids == whole[: len(stream.ids)], (pieces, stream.ids, whole)
    stream.close()
    return stream.ids


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("as_bytes", [False, True], ids=["str", "bytes"])
@given(text=texts, data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_streamed_ids_are_a_prefix_and_end_equal_to_the_whole_texts(name, as_bytes, text, data):
    tok = TOKENIZERS[name]
    seq = text.encode() if as_bytes else text  # bytes pieces split inside multi-byte characters too
    cuts = data.draw(st.lists(st.integers(0, len(seq)), max_size=len(seq)))
    whole = text_ids(tok, text)
    assert _streamed(tok, _cut(seq, cuts), whole) == whole
    if not any(a in text for a in ADDED):  # without added-token strings: the original processor's ids
        assert whole == tok.encode(clean(text).strip() + "\n", add_special_tokens=False).ids


@pytest.mark.parametrize("name", TOKENIZERS)
@given(text=texts)
@settings(max_examples=100, deadline=None)
def test_one_character_at_a_time(name, text):
    tok = TOKENIZERS[name]
    whole = text_ids(tok, text)
    assert _streamed(tok, list(text), whole) == whole


@pytest.mark.parametrize("text", ["Hello world. Wait... now. ", "Hi!  \n", "I'll pay 1,000 dollars?\t",
                                  "a\u0315\u0301 b \u0323", "say <|im_end|> <|i"])
def test_hard_cases_byte_by_byte(text):
    for tok in TOKENIZERS.values():
        whole = text_ids(tok, text)
        assert _streamed(tok, [bytes([b]) for b in text.encode()], whole) == whole


def test_ids_are_final_as_soon_as_the_rule_allows():
    tok = TOKENIZERS["trained"]
    stream = TextStream(tok)
    stream.feed("  Hello world. Th")  # leading spaces stripped, " Th" may still grow
    assert stream.ids == tok.encode("Hello world.").ids
    stream = TextStream(tok)
    stream.feed("Hello world. ")  # the end may strip the space and merge "." with the newline (".\n")
    assert stream.ids == tok.encode("Hello world").ids
    assert stream.close() == tok.encode(".\n").ids


def test_the_golden_runs_texts_give_the_reference_processors_ids():
    golden = json.loads((DATA / "golden.json").read_text())
    for name, spec in golden["runs"].items():
        want = np.array(mx.load(str(DATA / f"run_{name}.safetensors"))["text_ids"]).tolist()
        assert text_ids(TINY, spec["text"]) == want, name


def test_added_token_strings_are_plain_text():
    text = "hi <|image_pad|> there"
    assert 276 in TINY.encode(text, add_special_tokens=False).ids  # what the original processor would feed
    ids = text_ids(TINY, text)
    assert max(ids) < TINY.get_vocab_size(with_added_tokens=False)
    assert TINY.decode(ids) == text + "\n"


def test_a_transformers_tokenizer_works_as_its_backend():
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(DATA / "tokenizer"))
    text = "“Quoted” winner’s <|im_end|> café. "
    assert text_ids(fast, text) == text_ids(TINY, text)
    stream = TextStream(fast)
    stream.feed(text)
    stream.close()
    assert stream.ids == text_ids(TINY, text)


def test_bad_pieces_are_user_errors():
    with pytest.raises(UserError, match="not valid UTF-8"):
        TextStream(TINY).feed(b"ok \xff")
    stream = TextStream(TINY)
    stream.feed("ok \u4f60".encode()[:-1])
    with pytest.raises(UserError, match="not valid UTF-8"):  # the text ends inside a character
        stream.close()
    stream = TextStream(TINY)
    stream.feed("\u4f60".encode()[:1])
    with pytest.raises(UserError, match="middle of a UTF-8 character"):
        stream.feed("x")
    with pytest.raises(UserError, match="not int"):
        TextStream(TINY).feed(7)


def test_text_source_whole_and_pieces():
    ids, wait = text_source(TINY, "Hello world.")
    assert (ids.ids, ids.closed, wait) == (text_ids(TINY, "Hello world."), True, None)
    for pieces in (iter(()), "Hi there, the winner.".encode()):
        ids, wait = text_source(TINY, pieces)
        wait(ids, 100)
        assert ids.closed and ids.ids == text_ids(TINY, pieces.decode() if isinstance(pieces, bytes) else "")


# --- the window loop fed from pieces (tiny realtime model, injected noise, forced stop) ---------------------------

SPOKEN = "Hé wins, 你 winner’s café. Then… win!"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return realtime_tiny(tmp_path_factory.mktemp("voice"))


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0].model


@pytest.fixture(scope="module")
def voice(tiny):
    return tiny[1]


def _run(model, voice, text):
    """Every kept frame of a run on `text` (a str or pieces), the stop forced three frames after the text's last
    window, so the last text window and a speech-only window are heard."""
    n_windows = -(-len(text_ids(TINY, SPOKEN)) // TEXT_WINDOW)
    stop = 6 * n_windows + 2
    noise = mx.random.normal((stop + 6, model.config.acoustic_vae_dim), key=mx.random.key(3))
    ids, wait = text_source(TINY, text)
    audio = windows(model, voice, ids, lambda f: noise[f], lambda f, p: f >= stop, wait=wait)
    return np.concatenate([np.array(a) for a in audio])


def _window_edges(text):
    """Character offsets at which the ids of window 1, 2, ... begin."""
    offsets = plain_tokenizer(TINY).encode(text.strip() + "\n", add_special_tokens=False).offsets
    return [offsets[i][0] for i in range(TEXT_WINDOW, len(offsets), TEXT_WINDOW)]


@pytest.fixture(scope="module")
def whole_run(model, voice):
    return _run(model, voice, SPOKEN)


@pytest.mark.parametrize("chunking", ["inside words", "inside characters", "window edges", "single characters"])
def test_audio_from_pieces_equals_the_whole_text_run(model, voice, whole_run, chunking):
    raw = SPOKEN.encode()
    pieces = {"inside words": _cut(SPOKEN, range(2, len(SPOKEN), 3)),
              "inside characters": _cut(raw, [i for i in range(len(raw)) if raw[i] & 0xC0 == 0x80]),
              "window edges": _cut(SPOKEN, _window_edges(SPOKEN)),
              "single characters": list(SPOKEN)}[chunking]
    assert len(pieces) > 3
    got = _run(model, voice, iter(pieces))
    assert got.shape == whole_run.shape and np.array_equal(got, whole_run)


def test_window_0_speaks_before_the_text_has_ended(model, voice):
    pieces, taken = SPOKEN.split(" "), []

    def producer():
        for i, word in enumerate(pieces):
            taken.append(word)
            yield word if i == 0 else " " + word

    ids, wait = text_source(TINY, producer())
    first = next(windows(model, voice, ids, lambda f: mx.zeros((model.config.acoustic_vae_dim,)), wait=wait))
    assert first.shape == (model.config.hop_length,)
    assert len(ids.ids) >= TEXT_WINDOW and not ids.closed and len(taken) < len(pieces)

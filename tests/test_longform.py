"""The long-form splitter: parts that fit, cut at turns, then sentences, clauses and words; speakers and pauses kept.

The fit rule is re-derived here from architecture.md §6.6 (`fits_as_part`), not taken from the module, and the
properties run over generated scripts (hypothesis) with a simple additive token count.
"""

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vibevoice_mlx.errors import UserError
from vibevoice_mlx.longform import (CLAUSE, END, FITS, PAUSE, SENTENCE, TURN, WORD, Part, count_words,
                                    estimate_seconds, parts_items, pause_tag, pieces, prompt_counter, split_script)
from vibevoice_mlx.processor import Pause, Segment, SpecialTokens, build_prompt, parse_script, script_speakers

RATE = 7.5  # speech frames per second of the real models


class Counter:
    """An additive prompt size: a base, a voice section per voice, and each line's characters."""

    def __init__(self, base=40, per_voice=30, per_char=1.0):
        self.base, self.per_voice, self.per_char = base, per_voice, per_char
        self.calls = 0

    def __call__(self, lines, voices):
        self.calls += 1
        return self.base + self.per_voice * len(voices) + sum(4 + math.ceil(self.per_char * len(t)) for _, t in lines)


def fits_as_part(text, counter, context, max_tokens=None, max_words=None, margin=1.25):
    """The rule, independently: every segment's prompt n and speech steps satisfy n + steps <= context and
    steps <= 2 n (and the caps), as the processor will parse the part."""
    items = parse_script(text)
    voices = tuple(range(len(script_speakers(items))))
    words = 0
    for seg in (i for i in items if isinstance(i, Segment)):
        n = counter(seg.lines, voices)
        spoken = " ".join(t for _, t in seg.lines)
        steps = math.ceil(estimate_seconds(spoken) * margin * RATE) + 2
        words += count_words(spoken)
        if n + steps > context or steps > 2 * n or (max_tokens is not None and n > max_tokens):
            return False
    return max_words is None or words <= max_words


def events(items):
    """(speaker, text without whitespace) lines and pause sample counts, in order."""
    out = []
    for item in items:
        if isinstance(item, Pause):
            out.append(("pause", item.num_samples()))
        else:
            out += [(s, re.sub(r"\s", "", t)) for s, t in item.lines]
    return out


def align(script, parts):
    """Map each part line to the script line it comes from; asserts the parts speak exactly the script, in order.
    Returns [(script line index, part index, whole)] per part line, whole meaning the script line is not cut
    (lines counted over the script's segments, pauses left out)."""
    want = events(parse_script(script))
    got = []
    for k, part in enumerate(parts):
        got += [(e, k) for e in events(parts_items([part]))]
    out, g, i = [], 0, -1
    for w in want:
        if w[0] == "pause":
            assert got[g][0] == w, (got[g], w)
            g += 1
            continue
        start, acc, i = g, "", i + 1
        while acc != w[1]:
            (speaker, text), k = got[g]
            assert speaker == w[0], f"line {i}: speaker {speaker} != {w[0]}"
            acc += text
            assert w[1].startswith(acc), f"line {i}: {acc!r} is no prefix of {w[1]!r}"
            g += 1
        out += [(i, got[j][1], g - start == 1) for j in range(start, g)]
    assert g == len(got), "the parts say more than the script"
    return out


# --- pieces, words, pauses ---


def test_sentence_ends_latin_cjk_quotes_and_what_is_no_end():
    text = 'He said "Stop!" Then e.g. this. Pi is 3.14… ok. Wait... Really?! 你好。「好」！我们走；好吗？ End'
    got = pieces(text, SENTENCE)
    assert "".join(got) == text
    assert got == ['He said "Stop!" ', "Then e.g. this. ", "Pi is 3.14… ok. ", "Wait... ", "Really?! ", "你好。",
                   "「好」！", "我们走；", "好吗？ ", "End"]


def test_clauses_and_words():
    assert pieces("One, two; three: four，五、六：七", CLAUSE) == ["One, ", "two; ", "three: ", "four，", "五、", "六：", "七"]
    assert pieces("a,b stays", CLAUSE) == ["a,b stays"]  # no space after the comma: no clause end
    assert pieces("Hello 你好。world  again", WORD) == ["Hello ", "你", "好。", "world  ", "again"]
    assert count_words("Hello, world! 你好。 It's 3.14") == 2 + 2 + 4  # "It's" is two runs, 3.14 too


@pytest.mark.parametrize("seconds", [1.0, 0.25, 0.5, 1.5, 0.001, 1 / 3, 12.345678901, 1e-05])
def test_pause_tags_read_back_exactly(seconds):
    [pause] = parse_script(f"Speaker 1: a {pause_tag(Pause(seconds))} b")[1:2]
    assert pause.seconds == seconds


# --- what is split, and where ---


def test_a_script_that_fits_is_returned_as_written():
    script = "Speaker 1: Hello there.  \n  Speaker 2: Hi! [pause:300ms] How are you?\n"
    [part] = split_script(script, Counter(), context=4096)
    assert part.text == script and part.reason == FITS and part.fits
    assert part.speakers == (0, 1) and part.voice_indices == (0, 1)
    assert part.seconds == pytest.approx(estimate_seconds("Hello there. Hi! How are you?") + 0.3)


def test_turns_are_cut_before_sentences():
    turns = [f"Speaker {1 + i % 2}: " + " ".join(f"Sentence {i} number {k} here." for k in range(4))
             for i in range(6)]
    script = "\n".join(turns)
    counter = Counter()
    # a turn: 111 tokens and 20 words (8 s, 77 steps), and 40 + 2 x 30 for the rest of the prompt: three turns
    # take 433 + 231 positions, four 544 + 306
    context = 700
    parts = split_script(script, counter, context)
    assert [p.reason for p in parts] == [TURN, END]
    assert all(p.fits and fits_as_part(p.text, counter, context) for p in parts)
    assert all(w for _, _, w in align(script, parts))  # no turn was cut
    assert counter.calls < 30  # the whole script once, then galloping per part


def test_an_overlong_turn_is_cut_at_sentences_then_clauses_then_words():
    long_turn = " ".join(f"This is sentence {k}, which runs on." for k in range(12))
    script = f"Speaker 1: Short one.\nSpeaker 2: {long_turn}\nSpeaker 1: Bye."
    counter = Counter()
    parts = split_script(script, counter, context=300)
    reasons = [p.reason for p in parts]
    assert reasons[0] == TURN and SENTENCE in reasons and reasons[-1] == END
    assert all(p.fits and fits_as_part(p.text, counter, 300) for p in parts)
    align(script, parts)
    # one sentence too long for a part: cut at its clause, then between words
    sentence = "A very long sentence, " + " ".join(["word"] * 40) + "."
    parts = split_script(f"Speaker 1: {sentence}", counter, context=200)
    assert {p.reason for p in parts[:-1]} <= {CLAUSE, WORD} and WORD in [p.reason for p in parts]
    assert parts[0].text == "Speaker 1: A very long sentence,\n"
    assert all(p.fits for p in parts)


def test_an_unsplittable_piece_is_flagged_not_dropped():
    word = "x" * 400
    parts = split_script(f"Speaker 1: Fine.\nSpeaker 1: {word}", Counter(), context=300)
    assert [p.fits for p in parts] == [True, False]
    assert parts[1].text == f"Speaker 1: {word}\n" and parts[1].reason == END


def test_the_length_rule_twice_the_prompt_splits_too():
    # Without voices the prompt is short: 60 words (24 s of speech, 227 steps) against a prompt of 75 tokens
    # fit the context many times over, but not the 2 n rule.
    script = "Speaker 1: " + " ".join(f"Word{k}." for k in range(60))
    counter = Counter(base=30, per_voice=0, per_char=0.1)
    parts = split_script(script, counter, context=32768)
    assert len(parts) > 1 and all(fits_as_part(p.text, counter, 32768) for p in parts)
    assert all(p.reason in (SENTENCE, END) for p in parts)


def test_caps_on_tokens_and_words():
    script = "\n".join(f"Speaker 1: Turn {i} has five words." for i in range(10))
    parts = split_script(script, Counter(), context=65536, max_words=12)
    assert [p.words for p in parts] == [10] * 5
    parts = split_script(script, Counter(), context=65536, max_tokens=150)
    assert all(p.tokens <= 150 for p in parts) and len(parts) > 1


def test_pauses_keep_their_place_and_length():
    script = ("[pause:200ms] Speaker 1: One. Two. Three. [pause:1.5s] Four. Five.\n[pause]\n"
              "Speaker 2: Six. Seven. [pause:33ms]")
    parts = split_script(script, Counter(), context=4096, max_words=2)
    assert [p.words for p in parts] == [2, 1, 2, 2] and [p.reason for p in parts] == [SENTENCE, PAUSE, PAUSE, END]
    align(script, parts)
    pauses = [i.seconds for i in parts_items(parts) if isinstance(i, Pause)]
    assert pauses == [0.2, 1.5, 1.0, 0.033]
    assert sum(p.seconds for p in parts) == pytest.approx(
        estimate_seconds("One. Two. Three. Four. Five. Six. Seven.") + 2.733)


# --- speakers ---


@pytest.mark.parametrize("first", [0, 1])
def test_a_part_with_later_speakers_only_keeps_their_voices(first):
    a, b, c = first, first + 1, first + 2  # as written; the processor numbers them 0, 1, 2
    script = (f"Speaker {a}: " + "Alpha speaks here. " * 6 + f"\nSpeaker {b}: " + "Bravo answers now. " * 6 +
              f"\nSpeaker {c}: Charlie.\nSpeaker {b}: Bravo again.")
    parts = split_script(script, Counter(), context=330)
    assert len(parts) >= 2
    later = [p for p in parts if 0 not in p.speakers]
    assert later, [p.speakers for p in parts]
    for p in later:
        items = parse_script(p.text)
        assert script_speakers(items) == list(range(len(p.speakers)))  # re-parsed as 0, 1, ...
        assert p.voices(["alpha.wav", "bravo.wav", "charlie.wav"]) == [
            ["alpha.wav", "bravo.wav", "charlie.wav"][s] for s in p.speakers]
    align(script, parts)
    assert parts[-1].speakers == (1, 2) and parts[-1].voices(["A", "B", "C"]) == ["B", "C"]
    assert parts[-1].voices(None) is None
    with pytest.raises(UserError, match="one voice per speaker"):
        parts[-1].voices(["A", "B"])


@pytest.mark.parametrize("context", [4096, 200])
def test_huge_speaker_numbers_cost_nothing(context):
    """Speaker ids as written are text: no range up to the largest one is built (it took gigabytes, then a
    MemoryError or an OverflowError), whether the script fits whole or is split."""
    import time
    import tracemalloc

    big, huge = 100_000_000, 12345678901234567890
    script = f"Speaker {big}: " + "Hello there. " * 8 + f"\nSpeaker {huge}: " + "Fine, thanks. " * 8
    tracemalloc.start()
    start = time.perf_counter()
    parts = split_script(script, Counter(), context=context)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 5 and peak < 20e6, (elapsed, peak)
    assert (len(parts) == 1) == (context == 4096)
    assert sorted({s for p in parts for s in p.speakers}) == [big - 1, huge - 1]  # 0-based, as parsed
    align(script, parts)  # the parts speak the script's lines, speakers included


# --- the real prompt ---


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny["tokenizer"]))


def test_beyond_the_tiny_models_context_with_the_exact_prompt_count(tok):
    special = SpecialTokens.from_tokenizer(tok)
    frames = [40, 25]  # voice prompts of 40 and 25 frames
    count = prompt_counter(tok, special, frames)
    sentences = [f"Line {i} is said by someone, and then it goes on a little. " for i in range(80)]
    script = "\n".join(f"Speaker {1 + i % 2}: " + "".join(sentences[i:i + 5]) for i in range(0, 80, 5))
    script += "\nSpeaker 2: 这是一个很长的句子。" * 3
    context = 4096  # the tiny model's; the script's text alone takes about 5000 tokens
    whole = sum(len(tok.encode(f" Speaker {s}:{t}\n")) for s, t in parse_script(script)[0].lines)
    assert whole > context
    # Speech at 1.5 frames per second keeps the step count about the prompt's size, so the context binds.
    parts = split_script(script, count, context, frame_rate=1.5)
    assert len(parts) > 1 and all(p.fits for p in parts)
    align(script, parts)
    for p in parts:
        items = parse_script(p.text)
        # what generation builds for this part with p.voices(...) (generation.ScriptRun), segment by segment
        lengths = [len(build_prompt(tok, seg.lines, p.voices(frames), special,
                                    num_speakers=len(script_speakers(items))).input_ids)
                   for seg in items if isinstance(seg, Segment)]
        assert p.tokens == max(lengths) and p.tokens < context
    with pytest.raises(UserError, match="one voice per speaker"):
        split_script(script, prompt_counter(tok, special, [40]), context, frame_rate=1.5)


# --- properties over generated scripts ---

WORDS = st.sampled_from(["alpha", "beta", "gamma", "delta", "x", "longerword", "3.14", "don't", "e.g.", "你", "好",
                         "世界", "Mr.", "OK"])
END_MARKS = st.sampled_from(["", ".", "!", "?", "…", "。", "！", "？", "；", ",", "，", "、", '."', "!)", "。」"])


@st.composite
def sentence(draw):
    words = draw(st.lists(WORDS, min_size=1, max_size=12))
    return " ".join(words) + draw(END_MARKS)


@st.composite
def scripts(draw):
    base = draw(st.sampled_from([0, 1]))
    lines = []
    for _ in range(draw(st.integers(1, 10))):
        speaker = base + draw(st.integers(0, 3))
        body = ""
        for s in draw(st.lists(sentence(), min_size=1, max_size=8)):
            body += s + draw(st.sampled_from([" ", " ", "", "  "]))
            if draw(st.integers(0, 9)) == 0:
                body += draw(st.sampled_from(["[pause] ", "[pause:250ms] ", "[pause:0.5s]"]))
        lines.append(f"Speaker {speaker}: {body}")
        if draw(st.integers(0, 6)) == 0:
            lines.append(draw(st.sampled_from(["[pause:100ms]", "continued without a label."])))
    return "\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts(), context=st.integers(60, 1500), per_char=st.sampled_from([0.2, 0.5, 1.0, 2.0]),
       max_words=st.one_of(st.none(), st.integers(1, 40)))
def test_properties(script, context, per_char, max_words):
    try:
        parse_script(script)
    except UserError:
        return  # e.g. a script of pauses only: nothing to split
    counter = Counter(base=20, per_voice=15, per_char=per_char)
    parts = split_script(script, counter, context, max_words=max_words)
    assert all(isinstance(p, Part) for p in parts)
    rows = align(script, parts)  # the parts speak the script's text, speakers and pauses, in order
    if len(parts) == 1 and parts[0].reason == FITS:
        assert parts[0].text == script  # a script that fits is untouched
        return
    assert fits_as_part(script, counter, context, max_words=max_words) is False
    assert parts[-1].reason == END and all(p.reason in (TURN, PAUSE, SENTENCE, CLAUSE, WORD, END) for p in parts)
    for k, p in enumerate(parts):
        ok = fits_as_part(p.text, counter, context, max_words=max_words)
        assert p.fits == ok, (p, ok)
        if not p.fits:  # flagged only when nothing is left to cut: a single word
            segments = [i for i in parse_script(p.text) if isinstance(i, Segment)]
            assert len(segments) == 1 and len(segments[0].lines) == 1, p.text
            assert len(pieces(segments[0].lines[0][1].strip(), WORD)) == 1, p.text
    script_lines = [(s, t) for it in parse_script(script) if isinstance(it, Segment) for s, t in it.lines]
    for i, k, whole in rows:
        if not whole:  # a turn is cut only when it does not fit a part by itself
            s, t = script_lines[i]
            assert not fits_as_part(f"Speaker 1:{t}", counter, context, max_words=max_words), t
    # each part is as long as fits: with the next script line whole, it would not
    starts = {}
    for i, k, whole in rows:
        starts.setdefault(k, (i, whole))
    for k in range(len(parts) - 1):
        i, whole = starts[k + 1]
        if parts[k].fits and whole and parts[k].reason in (TURN, PAUSE):
            s, t = script_lines[i]
            names = {sp: n for n, sp in enumerate(sorted(set(parts[k].speakers) | {s}))}
            merged = ""
            for it in parse_script(parts[k].text):
                if isinstance(it, Pause):
                    merged += pause_tag(it) + "\n"
                else:
                    merged += "".join(f"Speaker {names[parts[k].speakers[a]] + 1}:{b}\n" for a, b in it.lines)
            merged += f"Speaker {names[s] + 1}:{t}\n"
            assert not fits_as_part(merged, counter, context, max_words=max_words), (parts[k].text, t)

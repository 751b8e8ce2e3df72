"""Script parsing, pause tags and the prompt layout of architecture.md §5, on the tiny fixture's tokenizer."""

import pytest

from vibevoice_mlx.audio import voice_frames
from vibevoice_mlx.processor import Pause, Segment, SpecialTokens, build_prompt, parse_script, script_speakers

# The tiny tokenizer's specials (fixtures.py): eos 256, speech_start 257, speech_end 258, speech_diffusion 259,
# pad 260. Written out here so that the tests do not take them from the code under test.
EOS, START, END, DIFF, PAD = 256, 257, 258, 259, 260
SYSTEM = (" Transform the text provided by various speakers into speech output, utilizing the distinct voice of "
          "each respective speaker.\n")


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny["tokenizer"]))


@pytest.fixture(scope="module")
def special(tok):
    return SpecialTokens.from_tokenizer(tok)


def lines_of(items):
    """The single segment of a script without pauses."""
    assert len(items) == 1 and isinstance(items[0], Segment), items
    return items[0].lines


# --- special tokens ---


def test_special_tokens_from_tiny_tokenizer(tok, special):
    assert (special.speech_start, special.speech_end, special.speech_diffusion, special.eos, special.pad) == \
        (START, END, DIFF, EOS, PAD)
    assert set(special.control_ids) == {START, END, DIFF, EOS}
    ok = {"speech_start": START, "speech_end": END, "speech_diffusion": DIFF, "eos": EOS}
    assert SpecialTokens.from_tokenizer(tok, ok) == special


def test_special_tokens_config_mismatch(tok):
    with pytest.raises(ValueError, match=r"speech_end.*tokenizer id 258, config id 151653"):
        SpecialTokens.from_tokenizer(tok, {"speech_start": START, "speech_end": 151653})


def test_special_tokens_missing_token():
    class NoSpecials:
        unk_token_id = None

        def convert_tokens_to_ids(self, token):
            return None

    with pytest.raises(ValueError, match=r"<\|vision_start\|>"):
        SpecialTokens.from_tokenizer(NoSpecials())


# --- script parsing ---


def test_one_based_ids_shift_to_zero():
    assert lines_of(parse_script("Speaker 1: Hello there.\nSpeaker 2: Hi!")) == [(0, " Hello there."), (1, " Hi!")]
    # The original subtracts exactly 1 when the smallest id is above 0.
    assert lines_of(parse_script("Speaker 2: a\nSpeaker 3: b")) == [(1, " a"), (2, " b")]


def test_zero_based_ids_kept():
    assert lines_of(parse_script("Speaker 0: a\nSpeaker 1: b\nSpeaker 0: c")) == [(0, " a"), (1, " b"), (0, " c")]
    assert lines_of(parse_script("Speaker 0: a\nSpeaker 2: b")) == [(0, " a"), (2, " b")]


def test_labels_case_and_spacing():
    assert lines_of(parse_script("speaker 1:Hi\nSPEAKER   2 :  Yo  ")) == [(0, " Hi"), (1, " Yo")]


def test_bracket_labels():
    assert lines_of(parse_script("[1]: Hi\n[2]: Yo")) == [(0, " Hi"), (1, " Yo")]
    assert lines_of(parse_script("[0]: Hi\nSpeaker 1: Yo")) == [(0, " Hi"), (1, " Yo")]


def test_continuation_lines_join_previous_speaker():
    script = "Speaker 1: Hello\nthere, friend.\n\n  How are you?\nSpeaker 2: Fine.\nReally."
    assert lines_of(parse_script(script)) == [(0, " Hello there, friend. How are you?"), (1, " Fine. Really.")]
    # A label with nothing after it takes its text from the next line.
    assert lines_of(parse_script("Speaker 1:\nHello")) == [(0, " Hello")]


def test_text_before_first_label_is_an_error():
    with pytest.raises(ValueError, match="Line 1 has no speaker label"):
        parse_script("Intro\nSpeaker 1: Hi")


def test_curly_quotes():
    got = lines_of(parse_script("Speaker 0: It\u2019s \u201cfine\u201d, \u2018ok\u2019"))
    assert got == [(0, " It's \"fine\", 'ok'")]


def test_plain_text_is_one_speaker():
    assert lines_of(parse_script("Hello world.\nSecond line.")) == [(0, " Hello world. Second line.")]
    assert lines_of(parse_script("  Just this  ")) == [(0, " Just this")]


@pytest.mark.parametrize("script", ["", "  \n\t\n", "[pause]", "Speaker 1:\n[pause:2s]"])
def test_empty_script(script):
    with pytest.raises(ValueError, match="no text"):
        parse_script(script)


def test_pause_tags_split_segments():
    script = ("Speaker 1: Hello. [pause] How are you?\n"
              "Speaker 2: Fine [pause:500ms] thanks.\n"
              "[pause:1.5s]\n"
              "Speaker 1: Bye. [PAUSE: 250 ms] Speaker 2: Bye!")
    items = parse_script(script)
    assert items == [
        Segment([(0, " Hello.")]),
        Pause(1.0),
        Segment([(0, " How are you?"), (1, " Fine")]),
        Pause(0.5),
        Segment([(1, " thanks.")]),
        Pause(1.5),
        Segment([(0, " Bye.")]),
        Pause(0.25),
        Segment([(1, " Bye!")]),
    ]
    assert [p.num_samples(24000) for p in items if isinstance(p, Pause)] == [24000, 12000, 36000, 6000]
    assert script_speakers(items) == [0, 1]


def test_shift_rule_spans_all_segments():
    # Speaker 2 alone after the pause must still be speaker 1, not 0.
    items = parse_script("Speaker 1: a [pause] Speaker 2: b")
    assert items == [Segment([(0, " a")]), Pause(1.0), Segment([(1, " b")])]


@pytest.mark.parametrize("tag", ["[pause:abc]", "[pause:500]", "[pause:2m]", "[pause:1.5s", "[pauses]",
                                 "[pause:-1s]"])
def test_malformed_pause_tags(tag):
    with pytest.raises(ValueError, match="Malformed pause tag") as e:
        parse_script(f"Speaker 1: Hello {tag} there")
    assert tag.split(":")[0] in str(e.value) and "line 1" in str(e.value)


# --- prompt layout ---


def test_prompt_example_of_spec(tok, special):
    """architecture.md §5.4's example, checked piece by piece with literal strings and ids."""

    def enc(text):
        return tok.encode(text, add_special_tokens=False)

    frames = [voice_frames(120000), voice_frames(79200)]
    assert frames == [38, 25]
    lines = lines_of(parse_script("Speaker 1: Hello there.\nSpeaker 2: Hi!"))
    got = build_prompt(tok, lines, frames, special)

    pieces = [
        (enc(SYSTEM), False), (enc(" Voice input:\n"), False),
        (enc(" Speaker 0:"), False), ([START], False), ([DIFF] * 38, True), ([END], False), (enc("\n"), False),
        (enc(" Speaker 1:"), False), ([START], False), ([DIFF] * 25, True), ([END], False), (enc("\n"), False),
        (enc(" Text input:\n"), False), (enc(" Speaker 0: Hello there.\n"), False),
        (enc(" Speaker 1: Hi!\n"), False), (enc(" Speech output:\n"), False), ([START], False),
    ]
    want_ids = [i for p, _ in pieces for i in p]
    want_mask = [m for p, m in pieces for _ in p]
    assert got.input_ids == want_ids
    assert got.speech_input_mask == want_mask
    assert got.voice_frames == [38, 25] and got.num_voices == 2
    # The mask covers exactly the 63 placeholders, and nothing of the text is special.
    assert sum(got.speech_input_mask) == 63
    assert all((i == DIFF) == m for i, m in zip(got.input_ids, got.speech_input_mask))
    assert got.input_ids[-1] == START
    text = tok.decode(got.input_ids)
    assert text == (SYSTEM + " Voice input:\n"
                    + " Speaker 0:<|vision_start|>" + "<|vision_pad|>" * 38 + "<|vision_end|>\n"
                    + " Speaker 1:<|vision_start|>" + "<|vision_pad|>" * 25 + "<|vision_end|>\n"
                    + " Text input:\n Speaker 0: Hello there.\n Speaker 1: Hi!\n Speech output:\n<|vision_start|>")


def test_prompt_without_voices(tok, special):
    got = build_prompt(tok, [(0, " Hi.")], None, special)
    assert tok.decode(got.input_ids) == SYSTEM + " Text input:\n Speaker 0: Hi.\n Speech output:\n<|vision_start|>"
    assert not any(got.speech_input_mask) and got.num_voices == 0
    assert build_prompt(tok, [(0, " Hi.")], [], special).input_ids == got.input_ids


def test_more_speakers_than_voices(tok, special):
    with pytest.raises(ValueError, match="2 speakers but only 1 voice"):
        build_prompt(tok, [(0, " a"), (1, " b")], [5], special)


def test_voices_truncated_to_speakers(tok, special):
    got = build_prompt(tok, [(0, " a"), (0, " b")], [3, 4, 5], special)
    assert got.voice_frames == [3] and sum(got.speech_input_mask) == 3
    # A segment of a longer script keeps the whole script's voice section.
    got = build_prompt(tok, [(1, " b")], [3, 4, 5], special, num_speakers=2)
    assert got.voice_frames == [3, 4] and sum(got.speech_input_mask) == 7
    assert tok.decode(got.input_ids).count("<|vision_start|>") == 3


def test_special_token_in_text_rejected(tok, special):
    with pytest.raises(ValueError, match="special token"):
        build_prompt(tok, [(0, " hi <|vision_pad|> there")], None, special)

"""A script with nothing to speak is refused, whatever invisible characters it holds: by the parser that the
library, `say` and the server share. Zero-width characters are not whitespace to `str.strip`, so a script of
them used to pass every check and make the model babble for seconds."""

import pytest
from click.testing import CliRunner

import server_helpers as sh
from vibevoice_mlx.cli import main
from vibevoice_mlx.errors import UserError
from vibevoice_mlx.processor import parse_script

INVISIBLE = [
    "\u200b\u200b",  # zero-width spaces
    "\u200c\u200d\u2060",  # zero-width non-joiner, joiner, word joiner
    "\u00ad \u200e\u200f",  # soft hyphen, bidi marks
    "\u3000\u00a0\t",  # ideographic and no-break spaces
    "\u0301\u0308",  # combining marks with nothing to sit on
    "Speaker 1: \u200b\nSpeaker 2:\u2060",  # labels whose turns are invisible
]


@pytest.mark.parametrize("script", INVISIBLE, ids=[repr(s) for s in INVISIBLE])
def test_a_script_of_invisible_characters_has_no_text(script):
    with pytest.raises(UserError, match="no text to speak"):
        parse_script(script)


def test_invisible_lines_are_skipped_and_visible_text_kept():
    # a stray zero-width line before the first label is not an unlabelled line of text
    assert [s.lines for s in parse_script("\u200b\nSpeaker 1: Hi\u200b there.\nSpeaker 2: \u200b")] == \
        [[(0, " Hi\u200b there.")]]
    assert [s.lines for s in parse_script("Speaker 0: e\u0301 ...")] == [[(0, " e\u0301 ...")]]


def test_say_refuses_a_zero_width_script_in_one_line(tiny, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text("Speaker 1: \u200b\u200b\n")
    for source in (["\u200b\u200b"], ["--file", str(script)]):
        out = tmp_path / "out.wav"
        r = CliRunner().invoke(main, ["say", *source, "--model", str(tiny["original"]), "--tokenizer",
                                      str(tiny["tokenizer"]), "-o", str(out)])
        assert r.exit_code == 1 and "Error: The script has no text to speak." in r.output, r.output
        assert "Traceback" not in r.output and not out.exists()


def test_the_server_answers_a_zero_width_input_with_a_400(tiny, tmp_path_factory):
    server = sh.shared_server(tiny, tmp_path_factory)
    r = server.speech(input="\u200b\u200b", response_format="wav")
    assert r.status == 400, r.body[:200]
    assert r.error["code"] == "invalid_input" and "no text to speak" in r.error["message"]

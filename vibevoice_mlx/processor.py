"""From a script and voice clips to model inputs: special tokens, script parsing, pause tags, prompt layout.

Follows the original `VibeVoiceProcessor` (architecture.md §5): the prompt is tokenized piece by piece, exactly as
the original does, so BPE merges never cross piece boundaries. Audio I/O lives in `audio.py`; encoding the voice
clips into latents is the model's job.
"""

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .constants import CONTROL_ROLES, SAMPLE_RATE, TOKEN_STRINGS
from .errors import UserError
from .notices import warn_once

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each "
    "respective speaker.\n"
)

@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the speech control tokens in the text tokenizer's vocabulary."""

    speech_start: int
    speech_end: int
    speech_diffusion: int
    eos: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer, token_ids: Optional[Dict[str, int]] = None) -> "SpecialTokens":
        """Look the tokens up by string; `token_ids` (the config's, e.g. {"speech_start": 151652, ...}) must agree."""
        ids = {}
        for role, token in TOKEN_STRINGS.items():
            i = tokenizer.convert_tokens_to_ids(token)
            if i is None or i == getattr(tokenizer, "unk_token_id", None) or \
                    tokenizer.convert_ids_to_tokens(i) != token:
                raise UserError(f"The tokenizer has no {token} token (VibeVoice's {role}); "
                                 "is it the model's Qwen2.5 tokenizer?")
            ids[role] = int(i)
        for role, want in (token_ids or {}).items():
            if role in ids and want is not None and int(want) != ids[role]:
                raise UserError(f"Tokenizer and model config disagree on {role} ({TOKEN_STRINGS[role]}): "
                                 f"tokenizer id {ids[role]}, config id {want}. Use the tokenizer that came with "
                                 "the model.")
        return cls(**ids)

    @property
    def control_ids(self) -> Tuple[int, int, int, int]:
        """The only tokens generation may choose from (pitfalls.md item 1)."""
        return tuple(getattr(self, role) for role in CONTROL_ROLES)


# --- script parsing ---


@dataclass
class Segment:
    """Script lines generated in one pass: (speaker id, text) with the text starting with a space."""

    lines: List[Tuple[int, str]] = field(default_factory=list)


@dataclass
class Pause:
    """Exact silence between two segments."""

    seconds: float

    def num_samples(self, sample_rate: int = SAMPLE_RATE) -> int:
        return int(round(self.seconds * sample_rate))


ScriptItem = Union[Segment, Pause]

_SPEAKER_RE = re.compile(r"^Speaker\s+(\d+)\s*:\s*(.*)$", re.IGNORECASE)
_BRACKET_RE = re.compile(r"^\[(\d+)\]\s*:\s*(.*)$")
# Anything that starts like a pause tag is checked, so a typo is an error instead of text the model reads out.
_PAUSE_START_RE = re.compile(r"\[\s*pause", re.IGNORECASE)
_PAUSE_RE = re.compile(r"\[\s*pause\s*(?::\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)\s*)?\]", re.IGNORECASE)
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
# Lines that look meant as a speaker label but are not one ("Speaker1:", "Speaker 2 hi", "[1] hi"): read aloud
# as text, as the original would, but said.
_NEAR_LABEL_RE = re.compile(r"^(speaker\s*\d+\s*[:\-.,]?|speaker\d+|\[\s*\d+\s*\]\s*[^:\s]?)", re.IGNORECASE)
MAX_PAUSE_SECONDS = 60.0  # one tag's silence; a typo like [pause:99999s] must not allocate gigabytes


def has_text(text: str) -> bool:
    """Whether `text` holds anything to speak: a letter, digit, mark of punctuation or symbol. Whitespace, format
    characters (zero-width space and joiners, bidi marks, soft hyphen), controls and lone combining marks are
    not: `str.strip` keeps the zero-width ones, and the model would babble over a prompt of them."""
    return any(unicodedata.category(c)[0] not in "ZCM" for c in text)


def _split_pauses(text: str, line_no: int) -> List[Union[str, Pause]]:
    """Split one line into text pieces and Pause items; malformed pause tags raise, naming the tag."""
    out: List[Union[str, Pause]] = []
    pos = 0
    for start in _PAUSE_START_RE.finditer(text):
        if start.start() < pos:
            continue
        m = _PAUSE_RE.match(text, start.start())
        if m is None:
            end = text.find("]", start.start())
            tag = text[start.start(): end + 1 if end >= 0 else start.start() + 20]
            raise UserError(f"Malformed pause tag {tag!r} on line {line_no}: use [pause] (1 s), [pause:500ms] "
                             "or [pause:1.5s].")
        seconds = 1.0 if m.group(1) is None else float(m.group(1)) / (1000.0 if m.group(2).lower() == "ms" else 1)
        if seconds > MAX_PAUSE_SECONDS:
            raise UserError(f"Pause tag {m.group(0)!r} on line {line_no} asks for {seconds:g} s of silence; one tag "
                            f"is at most {MAX_PAUSE_SECONDS:g} s: use several tags for a longer one.")
        out += [text[pos:m.start()], Pause(seconds)]
        pos = m.end()
    out.append(text[pos:])
    return out


def parse_script(script: str) -> List[ScriptItem]:
    """Parse a script into segments and pauses (architecture.md §5.2).

    Lines are `Speaker N: text` (case-insensitive) or `[N]: text`; a line without a label continues the previous
    speaker's turn; text with no label at all is one speaker (0). Ids are shifted to 0-based only when the smallest
    id is above 0, as the original does. Pause tags (`[pause]` = 1 s, `[pause:500ms]`, `[pause:1.5s]`) may stand
    anywhere and split the script into segments with exact silence between them; a speaker label may follow a
    pause on the same line. Curly quotes become straight ones.
    """
    pieces: List[Tuple[int, Union[str, Pause]]] = []
    script = script.lstrip("\ufeff")  # a byte-order mark is not text
    try:
        script.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer can take it
        raise UserError(f"The script holds an invalid character (U+{ord(script[e.start]):04X} at position "
                        f"{e.start}): it is not valid Unicode text.") from None
    for line_no, raw in enumerate(script.translate(_QUOTES).splitlines(), start=1):
        pieces += [(line_no, p if isinstance(p, Pause) else p.strip()) for p in _split_pauses(raw, line_no)]
    has_label = any(isinstance(p, str) and (_SPEAKER_RE.match(p) or _BRACKET_RE.match(p)) for _, p in pieces)

    items: List[ScriptItem] = []
    current: Optional[Segment] = None  # the segment being filled
    speaker: Optional[int] = None if has_label else 0  # whose turn a continuation belongs to
    joinable = False  # True when a continuation may be appended to the last line of `current`
    for line_no, piece in pieces:
        if isinstance(piece, Pause):
            items.append(piece)
            current, joinable = None, False
            continue
        if not has_text(piece):
            continue
        m = _SPEAKER_RE.match(piece) or _BRACKET_RE.match(piece)
        if m:
            speaker, text, new_turn = int(m.group(1)), m.group(2).strip(), True
        elif speaker is None:
            raise UserError(f"Line {line_no} has no speaker label and no speaker before it: {piece[:40]!r}. "
                             "Start it with 'Speaker N:'.")
        else:
            text, new_turn = piece, not joinable
            if _NEAR_LABEL_RE.match(piece):
                warn_once(logger, "Line %d looks like a speaker label but is not one: %r is read aloud. Write it "
                          "as 'Speaker N: text' or '[N]: text'.", line_no, piece[:40])
        if current is None:
            current = Segment()
            items.append(current)
        if new_turn:
            current.lines.append((speaker, " " + text))
        else:
            last_speaker, last_text = current.lines[-1]
            current.lines[-1] = (last_speaker, last_text.rstrip() + " " + text)
        joinable = True

    # A labelled turn left empty (e.g. "Speaker 1:" followed by a pause) has nothing to say.
    for seg in (s for s in items if isinstance(s, Segment)):
        seg.lines = [(s, t) for s, t in seg.lines if has_text(t)]
    items = [it for it in items if not (isinstance(it, Segment) and not it.lines)]
    ids = [s for seg in items if isinstance(seg, Segment) for s, _ in seg.lines]
    if not ids:
        raise UserError("The script has no text to speak.")
    if label_offset(ids):
        for seg in (s for s in items if isinstance(s, Segment)):
            seg.lines = [(s - 1, t) for s, t in seg.lines]
    if len(set(ids)) > 4:
        warn_once(logger, "The script has %d speakers; VibeVoice was trained with up to 4.", len(set(ids)),
                  key="speakers")  # a part of a split script counts its own
    return items


# Encodings a script file is read in, decided from its bytes: a byte-order mark says it; else UTF-8; else a
# single-byte Windows/Latin text, said. Anything else is refused, naming what was found.
_BOMS = [(b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")]
# A 90-minute script is about 100 KB of text; anything past this is no script (a log, a book, a wrong file) and
# would take gigabytes and minutes just to plan.
MAX_SCRIPT_BYTES = 2 << 20


def read_script_file(path) -> str:
    """The text of a script file as a person writes one: UTF-8 (with or without a BOM), UTF-16/32 with a BOM,
    CRLF or LF line ends, or a Windows-1252 / Latin-1 file (with a warning). Other bytes are a one-line error."""
    from pathlib import Path

    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCRIPT_BYTES + 1)  # never more: a pipe has no size to check first
    except FileNotFoundError:
        raise UserError(f"Script file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a script file.") from None
    except OSError as e:
        raise UserError(f"Cannot read the script file {path}: {e.strerror}.") from None
    return decode_script(data, path)


def decode_script(data: bytes, path="stdin") -> str:
    """The bytes of a script (a file's, or stdin's for `--file -`; read at most MAX_SCRIPT_BYTES + 1 of them) as
    text, by the rules of `read_script_file`; `path` names them in messages."""
    if len(data) > MAX_SCRIPT_BYTES:
        raise UserError(f"{path} is over {MAX_SCRIPT_BYTES >> 20} MiB, the most a script may hold (a 90-minute "
                        "script is about 100 KB): give the right file, or split it into several scripts.")
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding).lstrip("\ufeff")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} starts with a {encoding.upper()} byte-order mark but is not valid "
                                f"{encoding.upper()} (byte {e.start}): save it again as UTF-8.") from None
    if b"\x00" in data:
        raise UserError(f"{path} holds NUL bytes: it looks like UTF-16 or UTF-32 without a byte-order mark, or not "
                        "text at all. Save it as UTF-8.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = e.start
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 (byte {bad}) nor a Windows-1252/Latin-1 text: save it as "
                        "UTF-8.") from None
    logger.warning("%s is not UTF-8 (byte %d); read it as Windows-1252 (Latin-1). Save it as UTF-8 if some "
                   "characters come out wrong.", path, bad)
    return text


def label_offset(ids: Sequence[int]) -> int:
    """1 if speaker ids are 1-based (the smallest is above 0), else 0; the original subtracts exactly 1."""
    return 1 if min(ids) > 0 else 0


def script_speakers(items: Sequence[ScriptItem]) -> List[int]:
    """Sorted distinct speaker ids of a parsed script (all segments)."""
    return sorted({s for it in items if isinstance(it, Segment) for s, _ in it.lines})


# --- prompt ---


@dataclass
class PromptInputs:
    """Token ids of one prompt and where the voice latents go.

    speech_input_mask is True exactly on the speech_diffusion placeholders of the voice section;
    voice_frames lists the placeholder count of each voice used (in order), num_voices how many were used.
    """

    input_ids: List[int]
    speech_input_mask: List[bool]
    voice_frames: List[int]

    @property
    def num_voices(self) -> int:
        return len(self.voice_frames)


def build_prompt(tokenizer, lines: Sequence[Tuple[int, str]], voice_frames: Optional[Sequence[int]],
                 tokens: SpecialTokens, num_speakers: Optional[int] = None) -> PromptInputs:
    """The original prompt layout (architecture.md §5.4), each piece tokenized on its own.

    lines: (speaker id, text starting with a space) as `parse_script` gives them. voice_frames: frames per voice
    clip (`audio.voice_frames`), in speaker order; None or [] for no voice (the model then picks one). Voices are
    truncated to the number of distinct speakers, as the original does; `num_speakers` overrides that count so
    that every segment of a multi-segment script gets the same voice section.
    """

    def enc(text: str) -> List[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    if num_speakers is None:
        num_speakers = len({s for s, _ in lines})
    voices = list(voice_frames or [])
    if voices and len(voices) < num_speakers:
        raise UserError(f"The script has {num_speakers} speakers but only {len(voices)} voice(s) were given: "
                         "give one voice per speaker, in speaker order, or none.")
    voices = voices[:num_speakers]
    if voices and lines and max(s for s, _ in lines) >= len(voices):
        # The original allows this (voices are labelled 0..S-1 whatever the ids); say so, since it is likely a typo.
        warn_once(logger, "Speaker ids %s do not all have a voice: voices are labelled Speaker 0..%d in the order "
                  "given.", sorted({s for s, _ in lines}), len(voices) - 1, key="ids without a voice")

    ids: List[int] = []
    mask: List[bool] = []

    def add(piece: List[int], is_speech: bool = False):
        ids.extend(piece)
        mask.extend([is_speech] * len(piece))

    add(enc(SYSTEM_PROMPT))
    if voices:
        add(enc(" Voice input:\n"))
        for i, n in enumerate(voices):
            add(enc(f" Speaker {i}:"))
            add([tokens.speech_start])
            add([tokens.speech_diffusion] * int(n), is_speech=True)
            add([tokens.speech_end])
            add(enc("\n"))
    add(enc(" Text input:\n"))
    specials = set(tokens.control_ids) | {tokens.pad}
    for speaker, text in lines:
        piece = enc(f" Speaker {speaker}:{text}\n")
        if specials.intersection(piece):
            raise UserError(f"Speaker {speaker}'s text contains a special token string such as "
                             f"{TOKEN_STRINGS['speech_start']}: {text.strip()[:60]!r}")
        add(piece)
    add(enc(" Speech output:\n"))
    add([tokens.speech_start])
    return PromptInputs(ids, mask, [int(n) for n in voices])

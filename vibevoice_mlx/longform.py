"""Long scripts in parts: a script that does not fit the model's context or its length rule becomes consecutive
scripts ("parts"), each generated on its own with the same voices.

The split goes from coarse to fine and only as far as needed: between speaker turns first; inside a turn that does
not fit a part by itself, at sentence ends (`.!?…` followed by a space, CJK `。！？；` directly, closing quotes and
brackets kept with their sentence); inside a sentence that still does not fit, at clauses (`,;:` and `，、：`),
then between words (or CJK characters). A turn or sentence that fits is never cut, and a script that fits is
returned whole, as it was written.

What "fits" means (architecture.md §6.6). Pause tags cut a script into segments that are generated one by one,
each from its own prompt, so the rule is checked per segment. A segment whose prompt has n tokens may run
`min(context - n, 2 n)` steps; its speech needs about `steps = ceil(seconds * margin * frame_rate) + 2` of them
(one per frame, then speech_end and eos), where `seconds` is estimated from the words (`words_per_second`) and the
CJK characters (`cjk_chars_per_second`) and `margin` allows for speech slower than that. A part fits when every
segment has `n + steps <= context` and `steps <= 2 n`, and, when given, `n <= max_tokens` and the part's words
`<= max_words`.

Parts are written with `Speaker K:` labels numbered from 1 over the part's own speakers, so that the processor's
id shift (1-based ids become 0-based) always gives the part's speakers 0, 1, ...; `Part.speakers` maps them back to
the script's speakers and `Part.voices` picks their voices from the script's voice list.
"""

import math
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .audio import HOP
from .constants import SAMPLE_RATE
from .errors import UserError
from .processor import Pause, ScriptItem, Segment, SpecialTokens, build_prompt, parse_script, script_speakers

FRAME_RATE = SAMPLE_RATE / HOP  # 7.5 speech frames per second of audio

# count_tokens(lines, voices) -> prompt tokens of one segment: lines are (part speaker id, " text") as
# parse_script gives them; voices the indices (into the script's voices) of the part's speakers 0, 1, ...
TokenCounter = Callable[[Sequence[Tuple[int, str]], Tuple[int, ...]], int]

# Why a part ends where it does (Part.reason).
FITS = "fits"  # the whole script is one part
TURN = "speaker turn"
PAUSE = "pause"
SENTENCE = "sentence"
CLAUSE = "clause"
WORD = "word"
END = "end"  # the last part of a split script
LEVELS = (SENTENCE, CLAUSE, WORD)

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CLOSE = "\"'\u201d\u2019\u00bb)\\]}\u300d\u300f\u3011\u3015\u300b\u3009\uff09"
# Latin ends need a space (or the end) after them, so 3.14 and "e.g.x" stay whole; CJK ends stand alone.
_SENTENCE_RE = re.compile(rf"(?P<latin>[.!?\u2026]+[{_CLOSE}]*(?=\s|$))\s*|[\u3002\uff01\uff1f\uff1b]+[{_CLOSE}]*\s*")
_CLAUSE_RE = re.compile(rf"[,;:][{_CLOSE}]*(?=\s)\s*|[\uff0c\u3001\uff1a]+[{_CLOSE}]*\s*")
_WORD_RE = re.compile(rf"[{_CJK}][^\w\s]*\s*|[^\s{_CJK}]+\s*")
_CJK_RE = re.compile(rf"[{_CJK}]")
_WORDS_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Part:
    """One generation of a split script.

    text: a script the processor parses into this part's lines and pauses. speakers: the script's speakers
    (0-based, as `parse_script` numbers them) in the part, in order; `script_speaker` maps the part's own ids
    back to them. voice_indices: the script's voices (one per speaker, in speaker order) this part passes, in order.
    reason: why the part ends here (FITS, TURN, PAUSE, SENTENCE, CLAUSE, WORD, END). tokens: prompt tokens of its
    longest segment; seconds: estimated audio, pauses included; words: spoken words (CJK characters count one
    each). fits: False only for a piece that cannot be cut further and is still too long (generating it will be
    cut by the length rule).
    """

    text: str
    speakers: Tuple[int, ...]
    voice_indices: Tuple[int, ...]
    reason: str
    tokens: int
    seconds: float
    words: int
    fits: bool = True

    def script_speaker(self, k: int) -> int:
        """The script's speaker id of `parse_script(self.text)`'s id k: a split part is relabelled 0, 1, ...; a
        script that fits keeps its own ids."""
        return k if self.reason == FITS else self.speakers[k]

    def voices(self, voices: Optional[Sequence]) -> Optional[list]:
        """This part's voices out of the script's (one per speaker, in speaker order); None or [] stays so."""
        if not voices:
            return voices
        if max(self.voice_indices) >= len(voices):
            raise UserError(f"The script needs a voice for speaker {max(self.voice_indices) + 1} but only "
                            f"{len(voices)} voice(s) were given: give one voice per speaker, in speaker order, "
                            "or none.")
        return [voices[i] for i in self.voice_indices]


@dataclass(frozen=True)
class _Atom:
    """A piece of one line, the unit parts are packed from: `joins` is the boundary before it (TURN or PAUSE: a
    new line; a LEVELS entry: it continues the previous atom's line); pauses stand before or after it."""

    speaker: int
    text: str
    joins: str
    level: int = -1  # index into LEVELS of the cut that made it; -1 for a whole line
    before: Tuple[Pause, ...] = ()
    after: Tuple[Pause, ...] = ()


def count_words(text: str) -> int:
    """Spoken words: runs of letters or digits, each CJK character counting as one."""
    return len(_CJK_RE.findall(text)) + len(_WORDS_RE.findall(_CJK_RE.sub(" ", text)))


def estimate_seconds(text: str, words_per_second: float = 2.5, cjk_chars_per_second: float = 4.0) -> float:
    """Audio length of `text` spoken at an everyday pace (150 words a minute; 4 CJK characters a second)."""
    cjk = len(_CJK_RE.findall(text))
    return cjk / cjk_chars_per_second + len(_WORDS_RE.findall(_CJK_RE.sub(" ", text))) / words_per_second


def pieces(text: str, level: str) -> List[str]:
    """`text` cut after each sentence, clause or word end; the pieces concatenate back to `text`."""
    if level == SENTENCE:
        cuts = [m.end() for m in _SENTENCE_RE.finditer(text)
                # "e.g. the", "Mr. smith": a Latin end followed by a lower-case letter is no sentence end
                if not (m.group("latin") and text[m.end():m.end() + 1].islower())]
    elif level == CLAUSE:
        cuts = [m.end() for m in _CLAUSE_RE.finditer(text)]
    else:
        cuts = [m.end() for m in _WORD_RE.finditer(text)]
    cuts = [0] + sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def pause_tag(pause: Pause) -> str:
    """A tag the processor reads back as exactly this pause."""
    return f"[pause:{format(Decimal(repr(float(pause.seconds))), 'f')}s]"


def prompt_counter(tokenizer, tokens: SpecialTokens, voice_frames: Optional[Sequence[int]] = None) -> TokenCounter:
    """A `TokenCounter` that builds the very prompt generation builds (processor.build_prompt): needs only the
    tokenizer and each voice's frame count (`audio.voice_frames`, or a saved voice's latent rows), no weights."""
    voice_frames = list(voice_frames or [])

    def count(lines: Sequence[Tuple[int, str]], voices: Tuple[int, ...]) -> int:
        frames = None
        if voice_frames:
            if max(voices) >= len(voice_frames):
                raise UserError(f"The script has at least {max(voices) + 1} speakers but only {len(voice_frames)} "
                                "voice(s) were given: give one voice per speaker, in speaker order, or none.")
            frames = [voice_frames[v] for v in voices]
        return len(build_prompt(tokenizer, lines, frames, tokens, num_speakers=len(voices)).input_ids)

    return count


def _atoms(items: Sequence[ScriptItem]) -> List[_Atom]:
    """The script's lines as atoms, each pause attached to the line before it (the first line takes leading ones)."""
    atoms: List[_Atom] = []
    leading: List[Pause] = []
    joins = TURN
    for item in items:
        if isinstance(item, Pause):
            if atoms:
                atoms[-1] = replace(atoms[-1], after=atoms[-1].after + (item,))
            else:
                leading.append(item)
            joins = PAUSE
            continue
        for speaker, text in item.lines:
            atoms.append(_Atom(speaker, text.strip(), joins, before=tuple(leading) if not atoms else ()))
            joins = TURN
    return atoms


def _finer(atom: _Atom) -> Optional[List[_Atom]]:
    """The atom cut at the next level that cuts it at all, or None."""
    for level in range(atom.level + 1, len(LEVELS)):
        cut = pieces(atom.text, LEVELS[level])
        if len(cut) > 1:
            out = [_Atom(atom.speaker, t, LEVELS[level], level) for t in cut]
            out[0] = replace(out[0], joins=atom.joins, before=atom.before)
            out[-1] = replace(out[-1], after=atom.after)
            return out
    return None


def _layout(atoms: Sequence[_Atom]) -> List[Union[Pause, List[List]]]:
    """Atoms -> pauses and segments of [speaker, text] lines, as the processor will see the part."""
    out: List[Union[Pause, List[List]]] = []

    def segment() -> List[List]:
        if not out or isinstance(out[-1], Pause):
            out.append([])
        return out[-1]

    for i, a in enumerate(atoms):
        out.extend(a.before)
        lines = segment()
        if i and a.joins in LEVELS and lines:
            lines[-1][1] += a.text
        else:
            lines.append([a.speaker, a.text])
        out.extend(a.after)
    return out


class _Splitter:
    def __init__(self, count_tokens: TokenCounter, context: int, all_speakers: Sequence[int],
                 max_tokens: Optional[int], max_words: Optional[int], frame_rate: float, words_per_second: float,
                 cjk_chars_per_second: float, margin: float):
        self.count_tokens, self.context = count_tokens, context
        self.rank = {s: i for i, s in enumerate(all_speakers)}
        self.max_tokens, self.max_words = max_tokens, max_words
        self.frame_rate, self.margin = frame_rate, margin
        self.rates = (words_per_second, cjk_chars_per_second)
        self._counts: Dict[tuple, int] = {}

    def measure(self, atoms: Sequence[_Atom], relabel: bool = True):
        """-> (fits, text, speakers, voice indices, tokens, seconds, words) of `atoms` as one part."""
        layout = _layout(atoms)
        used = sorted({a.speaker for a in atoms})
        local = {s: (i if relabel else s) for i, s in enumerate(used)}
        voices = tuple(self.rank[s] for s in used)
        speakers = tuple(used)  # never a range up to the largest id: "Speaker 100000000:" is one speaker
        fits, tokens, seconds, words, text = True, 0, 0.0, 0, []
        for entry in layout:
            if isinstance(entry, Pause):
                seconds += entry.seconds
                text.append(pause_tag(entry))
                continue
            lines = tuple((local[s], " " + t.strip()) for s, t in entry)
            key = (lines, voices)
            if key not in self._counts:
                self._counts[key] = self.count_tokens(lines, voices)
            n = self._counts[key]
            spoken = " ".join(t for _, t in lines)
            speech = estimate_seconds(spoken, *self.rates)
            steps = math.ceil(speech * self.margin * self.frame_rate) + 2
            fits = fits and n + steps <= self.context and steps <= 2 * n and \
                (self.max_tokens is None or n <= self.max_tokens)
            tokens, seconds, words = max(tokens, n), seconds + speech, words + count_words(spoken)
            # 1-based labels: the processor shifts them back by exactly one, whichever speakers the part has
            text += [f"Speaker {s + 1}:{t}" for s, t in lines]
        fits = fits and (self.max_words is None or words <= self.max_words)
        return fits, "\n".join(text) + "\n", speakers, voices, tokens, seconds, words

    def longest(self, atoms: List[_Atom], i: int) -> int:
        """The largest j with atoms[i:j] fitting as one part (i if atoms[i] alone does not): galloping, then
        bisection, so a long part costs O(log n) counts rather than one per turn."""
        fits = lambda j: self.measure(atoms[i:j])[0]  # noqa: E731
        if not fits(i + 1):
            return i
        lo, step = i + 1, 1
        while lo < len(atoms):
            hi = min(lo + step, len(atoms))
            if not fits(hi):
                break
            lo, step = hi, step * 2
        else:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def part(self, atoms: Sequence[_Atom], reason: str, relabel: bool = True) -> Part:
        fits, text, speakers, voices, tokens, seconds, words = self.measure(atoms, relabel)
        return Part(text, speakers, voices, reason, tokens, seconds, words, fits)


def split_script(
    script: Union[str, Sequence[ScriptItem]],
    count_tokens: TokenCounter,
    context: int,
    *,
    max_tokens: Optional[int] = None,
    max_words: Optional[int] = None,
    frame_rate: float = FRAME_RATE,
    words_per_second: float = 2.5,
    cjk_chars_per_second: float = 4.0,
    margin: float = 1.25,
) -> List[Part]:
    """Split a script (text, or `parse_script`'s items) into parts that each fit (see the module docstring).

    count_tokens: prompt tokens of one segment (`prompt_counter` builds the exact one). context: the model's
    positions (`ModelConfig.max_positions`). max_tokens / max_words: optional caps per part (the user's choice).
    frame_rate: speech frames per audio second (SAMPLE_RATE / hop). A script that fits is one part with reason
    FITS and, when given as text, that very text. Otherwise parts are packed greedily in order, each as long as
    fits, and each ends with the reason of its cut; a piece that cannot be cut and does not fit is a part of its
    own with `fits=False`.
    """
    items = parse_script(script) if isinstance(script, str) else list(script)
    atoms = _atoms(items)
    if not atoms:
        raise UserError("The script has no text to speak.")
    splitter = _Splitter(count_tokens, context, script_speakers(items), max_tokens, max_words, frame_rate,
                         words_per_second, cjk_chars_per_second, margin)
    # Whole, the script keeps its own ids (and text): what `generate` would run without a split.
    whole = splitter.part(atoms, FITS, relabel=False)
    if whole.fits:
        return [replace(whole, text=script)] if isinstance(script, str) else [whole]
    parts: List[Part] = []
    i = 0
    while i < len(atoms):
        j = splitter.longest(atoms, i)
        if j == i:
            finer = _finer(atoms[i])
            if finer is not None:
                atoms[i:i + 1] = finer
                continue
            j = i + 1  # cannot be cut further: a part of its own, flagged by measure()
        parts.append(splitter.part(atoms[i:j], atoms[j].joins if j < len(atoms) else END))
        i = j
    return parts


def parts_items(parts: Sequence[Part]) -> List[ScriptItem]:
    """The script's items as the parts will speak them: each part parsed, its ids mapped back to the script's
    (what a test or a `--dry-run` compares with `parse_script` of the whole script)."""
    out: List[ScriptItem] = []
    for part in parts:
        for item in parse_script(part.text):
            out.append(item if isinstance(item, Pause) else
                       Segment([(part.script_speaker(s), t) for s, t in item.lines]))
    return out

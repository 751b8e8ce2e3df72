"""Long scripts spoken part by part into one file, resumable (what `say` does when a script needs splitting).

`longform.split_script` cuts a script that does not fit the context or the length rule into parts. Each part is
generated on its own with the same voices and a seed derived from the run's seed and the part's index, so a part
comes out the same whether the run went straight through or was resumed. Every finished part is kept beside the
output in `<output>.parts/` (one WAV per part, written atomically, and `run.json` saying what they were made with);
re-running the same command continues from the first unfinished part, `--no-resume` starts over. The output file
is assembled only when every part is done; until then `<output>.partial.wav` holds what was made, valid at every
moment.
"""

import hashlib
import json
import logging
import math
import random
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf

from .checkpoint import model_identity
from .constants import SAMPLE_RATE
from .errors import UserError
from .longform import FITS, Part, estimate_seconds, prompt_counter, split_script
from .output import AudioWriter, DiskFullError, writing
from .processor import Segment, parse_script

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


def parse_chunk(value: Optional[str]) -> Tuple[bool, Optional[int], Optional[int]]:
    """`--chunk`: "auto" (split only what does not fit), "off" (never: a script that does not fit is an error),
    "<N>w" / "<N> words" (at most N words a part) or "<N>t" / "<N> tokens" (at most N prompt tokens a part).
    Returns (split, max_tokens, max_words)."""
    text = (value or "auto").strip().lower()
    if text == "auto":
        return True, None, None
    if text == "off":
        return False, None, None
    m = re.fullmatch(r"(\d+)\s*(w|words?|t|tokens?)", text)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--chunk {value!r}: use auto, off, a word limit such as 250w, or a token limit such as "
                        "1500t.")
    n = int(m.group(1))
    return (True, n, None) if m.group(2).startswith("t") else (True, None, n)


def plan(tokenizer, tokens, config, script: str, voice_frames: Sequence[int], chunk: Optional[str]) -> List[Part]:
    """The parts `say` will generate, from the config and tokenizer alone (no weights)."""
    from .preflight import check_context

    split, max_tokens, max_words = parse_chunk(chunk)
    counter = prompt_counter(tokenizer, tokens, voice_frames)
    if not split:
        items = parse_script(script)
        speakers = sorted({s for it in items if isinstance(it, Segment) for s, _ in it.lines})
        lengths = [counter(it.lines, tuple(range(len(speakers)))) for it in items if isinstance(it, Segment)]
        check_context(lengths, config.max_positions, config.hop_length, voices=bool(voice_frames))
        return [Part(script, tuple(speakers), tuple(range(len(speakers))), FITS, max(lengths),
                     estimate_seconds(script), len(script.split()))]
    parts = split_script(script, counter, config.max_positions, max_tokens=max_tokens, max_words=max_words,
                         frame_rate=SAMPLE_RATE / config.hop_length)
    # A piece that cannot be cut and whose prompt alone fills the context cannot run at all: said now, not after
    # the weights load (and --dry-run fails on it too).
    check_context([p.tokens for p in parts], config.max_positions, config.hop_length, voices=bool(voice_frames),
                  split=True)
    return parts


def describe(parts: Sequence[Part]) -> str:
    """What `--dry-run` prints: one line a part, then the totals."""
    lines = []
    for i, p in enumerate(parts, 1):
        first = " ".join(p.text.split())[:60]
        flag = "" if p.fits else "  (cannot be cut further; the length rule may cut it)"
        lines.append(f"part {i}/{len(parts)}: {p.tokens} prompt tokens, {p.words} words, ~{p.seconds:.1f} s, "
                     f"ends at: {p.reason} | {first}{flag}")
    total = sum(p.seconds for p in parts)
    lines.append(f"{len(parts)} part(s), about {total:.0f} s of audio ({total / 60:.1f} min) at an everyday pace")
    return "\n".join(lines)


def _fingerprint(value) -> str:
    h = hashlib.sha256()
    if isinstance(value, np.ndarray):
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    else:
        path = Path(value)
        h.update(path.read_bytes() if path.is_file() else str(value).encode())
    return h.hexdigest()[:16]


class PartStore:
    """`<output>.parts/`: the finished parts of one run and what they were made with (`run.json`, which also
    keeps the run's seed, drawn or given, for as long as parts are kept)."""

    def __init__(self, out: Path, key: Dict, resume: bool):
        self.folder = out.with_name(out.name + ".parts")
        key = json.loads(json.dumps(key))  # compared as it is stored
        old = self._read()
        if old is not None and resume:
            changed = [k for k in sorted(set(old) | set(key)) if k != "seed" and old.get(k) != key.get(k)]
            if changed:
                logger.warning("%s holds parts of a different run (other %s); starting over.", self.folder,
                               ", ".join(changed))
            elif key["seed"] is not None and key["seed"] != old.get("seed"):
                logger.warning("%s holds parts made with --seed %s, this run has --seed %s: starting over (run "
                               "with --seed %s to continue them).", self.folder, old.get("seed"), key["seed"],
                               old.get("seed"))
                changed = ["seed"]
            if changed:
                old = None
        elif old is not None:  # --no-resume
            old = None
        if old is None:
            shutil.rmtree(self.folder, ignore_errors=True)
        if key["seed"] is None:  # resuming a run that drew its own seed: the same one
            key["seed"] = old["seed"] if old is not None else random.SystemRandom().randrange(2**31)
        self.key = key
        self.folder.mkdir(exist_ok=True)
        with writing(self.folder / RUN_FILE):
            (self.folder / RUN_FILE).write_text(json.dumps(key, indent=2, sort_keys=True) + "\n")

    def _read(self) -> Optional[Dict]:
        path = self.folder / RUN_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def path(self, i: int) -> Path:
        return self.folder / f"part-{i + 1:04d}.wav"

    def done(self, i: int) -> bool:
        return self.path(i).is_file()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _speaker_at(part: Part, seconds: float) -> int:
    """The script speaker (0-based) whose line is estimated to be playing `seconds` into the part."""
    elapsed = 0.0
    last = part.speakers[0] if part.speakers else 0
    for item in parse_script(part.text):
        if isinstance(item, Segment):
            for s, text in item.lines:
                last = part.script_speaker(s)
                elapsed += estimate_seconds(text)
                if elapsed >= seconds:
                    return last
    return last


def speak_parts(pipe, parts: List[Part], script: str, voices: Sequence, voice_inputs: List, out: Path,
                options: Dict, resume: bool, force: bool, bar, player=None) -> Tuple[int, float, int]:
    """Generate `parts` into `out`; returns (exit status, audio seconds, the run's seed). Interrupted (Ctrl-C,
    SIGTERM), the finished parts stay for the next run and the output stays partial; a full disk keeps them
    too."""
    from . import generation as gen
    from .errors import Interrupted

    key = {"script": hashlib.sha256(script.encode()).hexdigest()[:16],
           "voices": [_fingerprint(v) for v in voices], "model": model_identity(pipe.folder),
           "seed": options.get("seed"), "options": {k: v for k, v in sorted(options.items()) if k != "seed"},
           "parts": [p.text for p in parts]}
    writer = AudioWriter(out, force=force)  # first: its lock keeps a second run off the parts too
    try:
        store = PartStore(out, key, resume)
    except BaseException:
        writer.abandon(remove=True)
        raise
    seed = store.key["seed"]
    budget = options.get("max_seconds")
    total_frames = sum(math.ceil(p.seconds * SAMPLE_RATE / pipe.hop_length) for p in parts)
    bar.reset(total=total_frames)
    made, frames, start = 0.0, 0, time.perf_counter()
    try:
        for i, part in enumerate(parts):
            if budget is not None and made >= budget:
                break
            if store.done(i):
                audio, _ = sf.read(str(store.path(i)), dtype="float32")
                writer.write(audio)
                made += len(audio) / SAMPLE_RATE
                logger.info("Part %d/%d: kept from the interrupted run (%.1f s).", i + 1, len(parts),
                            len(audio) / SAMPLE_RATE)
                bar.update(len(audio) // pipe.hop_length)
                continue
            logger.info("Part %d/%d (ends at: %s): %d prompt tokens, ~%.0f s.", i + 1, len(parts), part.reason,
                        part.tokens, part.seconds)
            part_voices = [voice_inputs[j] for j in part.voice_indices] if voice_inputs else None
            part_options = dict(options, seed=(seed + i) % 2**64)
            if budget is not None:
                part_options["max_seconds"] = budget - made
            part_writer = AudioWriter(store.path(i), force=True)
            try:
                part_start = made
                for r in gen.stream_generate(pipe, part.text, part_voices, **part_options):
                    if not r.audio.size:
                        continue
                    writer.write(r.audio)
                    part_writer.write(r.audio)
                    if player is not None:
                        player.write(r.audio.reshape(-1, 1))
                    made += len(r.audio) / SAMPLE_RATE
                    if not r.is_pause:
                        frames += 1
                        bar.update(1)
                    rate = made / (time.perf_counter() - start)
                    speaker = _speaker_at(part, made - part_start)
                    bar.set_postfix_str(f"part {i + 1}/{len(parts)}, speaker {speaker}, {made:.1f} s audio, "
                                        f"{rate:.2f}x real time", refresh=False)
            except BaseException:
                part_writer.abandon(remove=True)  # an unfinished part is made again on resume
                raise
            part_writer.close()
    except Interrupted as e:
        done = sum(store.done(i) for i in range(len(parts)))
        if not writer.frames and not done:  # nothing made: nothing left behind
            writer.abandon(remove=True)
            store.remove()
            logger.warning("Interrupted (%s) before any audio was made; nothing was written.", e)
            return e.status, 0.0, seed
        writer.abandon()
        logger.warning("Interrupted: %d of %d parts are done and kept in %s; run the same command again to go on "
                       "(--no-resume starts over). %s holds the %.1f s made so far (seed %d).", done, len(parts),
                       store.folder, writer.partial_path, made, seed)
        return e.status, made, seed
    except DiskFullError as e:
        writer.abandon(remove=True)
        done = sum(store.done(i) for i in range(len(parts)))
        if not done:
            store.remove()
            raise DiskFullError(f"{e}; nothing was written.") from None
        raise DiskFullError(f"{e}; kept {done} of {len(parts)} finished parts in {store.folder}: free some space "
                            "and run the same command again to go on.") from None
    except BaseException:
        writer.abandon()
        raise
    try:
        writer.close()
    except DiskFullError as e:
        raise DiskFullError(f"{e}; kept all {len(parts)} finished parts in {store.folder}: free some space and run "
                            "the same command again.") from None
    if writer.frames:
        store.remove()
    return 0, made, seed

"""`vibevoice-mlx say`: a script into an audio file, with everything checked before anything slow starts.

Order of work: read and parse the script, check every output path, read every voice, validate every option,
open the audio device; then read the model's config and tokenizer (no weights) to check that each prompt fits
the context and that the model fits in memory; only then load the weights. The output is written as audio is
made, through `output.AudioWriter`: the final name only ever holds a complete file, Ctrl-C and SIGTERM keep what
was made, a second run on the same path is refused.
"""

import logging
import math
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import click

from .errors import CLIError, Interrupted, UserError, user_errors
from .models import REALTIME
from .notices import once_per_run

logger = logging.getLogger(__name__)


def _read_script(text, file):
    from .processor import MAX_SCRIPT_BYTES, decode_script, read_script_file

    if file is not None and text:
        raise CLIError("Give the script as an argument or with --file, not both.")
    if file == "-":
        return decode_script(sys.stdin.buffer.read(MAX_SCRIPT_BYTES + 1), "stdin")
    if file is not None:
        return read_script_file(file)
    if text:
        return text
    raise CLIError("No script: give the text as an argument or --file script.txt.")


class _StdoutWriter:
    """`-o -`: the audio as one 16-bit WAV streamed to stdout as it is made, through the server's encoder (the
    header gives the sizes as unknown, as a streamed WAV does). Nothing made, nothing sent."""

    def __init__(self):
        self._stream = sys.stdout.buffer  # taken before stdout is pointed at stderr for the run
        if self._stream.isatty():
            raise UserError("-o - writes WAV audio to stdout, which is a terminal here: pipe it (-o - | ffplay -) "
                            "or redirect it (-o - > out.wav).")
        from .server.encode import WavEncoder

        self._encoder = WavEncoder()
        self.frames = 0

    @property
    def seconds(self) -> float:
        return self.frames / self._encoder.sample_rate

    def write(self, audio) -> None:
        try:
            self._stream.write(self._encoder.write(audio.reshape(-1)))
            self._stream.flush()
        except BrokenPipeError:  # the reader went away (`| head`): the end of the run, as SIGPIPE would be
            raise Interrupted(signal.SIGPIPE) from None
        self.frames += audio.size

    def __str__(self) -> str:
        return "stdout"

    def __enter__(self) -> "_StdoutWriter":
        return self

    def __exit__(self, *exc) -> None:
        pass


@contextmanager
def _signals_interrupt():
    """SIGINT and SIGTERM end the run through the normal exit path, so the output is finalized with what was
    made; restored afterwards."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave the defaults
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@click.command()
@click.argument("text", required=False)
@click.option("-f", "--file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the script from a text file (-: from stdin).")
@click.option("-m", "--model", default="microsoft/VibeVoice-1.5B", show_default=True,
              help="Converted MLX folder, PyTorch checkpoint folder, or Hugging Face repo id.")
@click.option("--voice", "voices", multiple=True,
              help="Voice sample (any audio file) or saved voice (.safetensors), one per speaker in speaker order.")
@click.option("--save-voice", "save_voices", multiple=True, type=click.Path(dir_okay=False),
              help="Save the encoded latents of the --voice at the same position (a .safetensors file).")
@click.option("-o", "--output", default="output.wav", show_default=True,
              type=click.Path(dir_okay=False, allow_dash=True),
              help="Output file; the format follows the extension (wav, flac, ogg, mp3, opus). -: a WAV stream on "
                   "stdout.")
@click.option("--steps", type=click.IntRange(1, 100), help="Diffusion steps (default: the model's, else 10).")
@click.option("--cfg-scale", type=click.FloatRange(0, 100), help="Classifier-free guidance scale (default: the "
              "model's, else 1.3).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), help="Seed for reproducible output.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 100),
              help="0: greedy token choice (the original); above 0: sample among the control tokens.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-seconds", type=click.FloatRange(0, 24 * 3600, min_open=True), help="Stop after this much audio.")
@click.option("--backend", default="mlx", show_default=True, type=click.Choice(["mlx", "torch"]))
@click.option("--device", default="auto", show_default=True, help="torch backend only: auto, mps, cuda or cpu.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Compute dtype (default: float16 on a GPU, float32 on the CPU).")
@click.option("--attention", default="auto", show_default=True, type=click.Choice(["auto", "sdpa", "eager"]),
              help="torch backend: attention implementation.")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the model folder has none.")
@click.option("--force", is_flag=True, help="Overwrite the output file and saved voices; skip the memory check.")
@click.option("--play", is_flag=True, help="Play while generating (needs: pip install 'vibevoice-mlx[play]').")
@click.option("--chunk", default="auto", show_default=True,
              help="Long scripts: auto (split only what does not fit), off, or a limit per part such as 250w "
                   "(words) or 1500t (prompt tokens).")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read the text from stdin; VibeVoice-Realtime-0.5B speaks it as it arrives (1.5B/7B: read whole).")
@click.option("--dry-run", is_flag=True, help="Print the parts, token counts and estimated length; load no weights.")
@click.option("--no-resume", is_flag=True, help="Start a split script over instead of continuing its finished parts.")
@click.pass_context
def say(ctx, text, file, model, voices, save_voices, output, force, play, chunk, from_stdin, dry_run, no_resume,
        **options):
    """Speak TEXT (or --file, or --stdin) into an audio file, writing it as the audio is produced."""
    quiet = bool((ctx.find_root().obj or {}).get("quiet"))
    run = {"chunk": chunk, "dry_run": dry_run, "resume": not no_resume}
    with user_errors(), once_per_run():  # checked here, then read again by generation: warned about once
        if from_stdin:
            if text or file is not None:
                raise CLIError("Give the script as an argument, with --file or with --stdin: one of them.")
            file = "-"
        from .preflight import is_realtime

        if is_realtime(model):
            status = _say_realtime(text, file, model, list(voices), list(save_voices), Path(output), force, play,
                                  quiet, options, run)
        else:
            status = _say(text, file, model, list(voices), list(save_voices), Path(output), force, play, quiet,
                          options, run)
    if status:
        ctx.exit(status)


def _say(text, file, model, voices, save_voices, out, force, play, quiet, options, run) -> int:
    from .audio import check_saved_voice_path
    from .generation import GenerationConfig
    from .processor import parse_script, script_speakers
    from .voices import read_voice

    from .longrun import parse_chunk

    script = _read_script(text, file)
    items = parse_script(script)
    speakers = script_speakers(items)
    parse_chunk(run["chunk"])
    out = _checked_output(out, force, run)
    if len(save_voices) > len(voices):
        raise UserError(f"{len(save_voices)} --save-voice paths for {len(voices)} --voice files: give one per voice.")
    for i, target in enumerate(save_voices):
        check_saved_voice_path(target, force)
        if str(voices[i]).endswith(".safetensors"):
            raise UserError(f"--save-voice {target}: {voices[i]} is already a saved voice; give the audio file.")
    if options["backend"] == "torch" and any(str(v).endswith(".safetensors") for v in voices):
        raise UserError("Saved voices (.safetensors) need the MLX backend; give the audio file with --backend torch.")
    # read (and checked) once; normalized by generation, exactly as a file path would be
    voice_inputs = [v if str(v).endswith(".safetensors") else read_voice(v, i, normalize=False)
                    for i, v in enumerate(voices)]
    if voice_inputs and len(voice_inputs) < len(speakers):
        raise UserError(f"The script has {len(speakers)} speakers but only {len(voices)} voice(s) were given: "
                        "give one voice per speaker, in speaker order, or none.")
    backend, device, dtype = options.pop("backend"), options.pop("device"), options.pop("dtype")
    attention, tokenizer = options.pop("attention"), options.pop("tokenizer")
    torch_only = [f"--{name} {value}" for name, value in (("device", device), ("attention", attention))
                  if value != "auto"]
    if backend == "mlx" and torch_only:
        raise UserError(f"{' and '.join(torch_only)}: only the torch backend has this option (MLX picks its own "
                        "device and attention); add --backend torch, or leave it out.")
    generate_options = {k: v for k, v in options.items() if v is not None}
    GenerationConfig(**generate_options)  # every option checked now, not after loading
    player = _player() if play and not run["dry_run"] else None
    try:
        # with -o -, stdout holds the audio alone: anything printed goes to stderr
        with _signals_interrupt(), redirect_stdout(sys.stderr) if isinstance(out, _StdoutWriter) else nullcontext():
            try:
                loaded = _load_checked(model, backend, device, dtype, attention, tokenizer, script, speakers,
                                       voice_inputs, force, run)
            except Interrupted as e:
                click.echo(f"Interrupted ({e}) while loading the model; nothing was written.", err=True)
                return e.status
            if loaded is None:  # --dry-run: the plan is printed, nothing loaded
                return 0
            pipe, parts = loaded
            if len(parts) > 1:
                return _generate_parts(pipe, parts, script, out, voices, voice_inputs, save_voices, force, player,
                                       quiet, generate_options, run["resume"])
            return _generate(pipe, script, out, voices, voice_inputs, save_voices, force, player, quiet,
                             generate_options)
    finally:
        if player is not None:
            player.stop()
            player.close()


def _checked_output(out, force, run):
    """The output checked before anything slow: a path that may be written (its format known), or `-o -`'s
    stdout writer; `run["stdout"]` says which."""
    from .output import check_output_path, output_format

    run["stdout"] = str(out) == "-"
    if run["stdout"] and not run["dry_run"]:
        return _StdoutWriter()
    if not run["stdout"]:
        if not run["dry_run"]:
            check_output_path(out, force)
        output_format(out)
    return out


def _load_checked(model, backend, device, dtype, attention, tokenizer, script, speakers, voice_inputs, force, run):
    """Config and tokenizer first (the parts to generate, whether they fit, whether the model fits in memory),
    then the weights. Returns (pipeline, parts), or None after printing the plan for --dry-run."""
    from .convert.cache import model_folder
    from .loader import inspect, load
    from .longrun import describe, plan
    from .preflight import check_memory, default_dtype_name

    folder = model_folder(model, dtype=dtype, tokenizer=tokenizer) if backend == "mlx" else model
    ckpt, config, tok, tokens = inspect(folder, tokenizer)
    frames = [math.ceil(len(v) / config.hop_length) if not isinstance(v, str) else _saved_frames(v)
              for v in voice_inputs]
    if frames and len(frames) < len(speakers):
        raise UserError(f"The script has {len(speakers)} speakers but only {len(frames)} voice(s) were given: give "
                        "one voice per speaker, in speaker order, or none.")
    parts = plan(tok, tokens, config, script, frames, run["chunk"])
    if run["dry_run"]:
        click.echo(describe(parts))
        return None
    if len(parts) > 1 and run["stdout"]:
        raise UserError(f"This script is spoken in {len(parts)} parts, kept as files to resume from: write it to a "
                        "file (-o out.wav) instead of stdout, or give a shorter script.")
    if len(parts) > 1:
        logger.warning("The script does not fit the model in one go: it is spoken in %d parts (see --dry-run; "
                       "--chunk off to refuse instead).", len(parts))
    if backend == "mlx" and not force:
        longest = max(p.tokens for p in parts)
        check_memory(ckpt, config, dtype or default_dtype_name(), min(config.max_positions, 3 * longest))
    pipe = load(ckpt.folder, backend=backend, device=device, dtype=dtype, tokenizer=tokenizer, attention=attention)
    return pipe, parts


def _saved_frames(path) -> int:
    from .audio import load_voice

    return int(load_voice(path)[0].shape[0])


def _save_voices(pipe, voices, voice_inputs, save_voices, force, quiet):
    """Encode the voices once, as the run does (one padded batch), save the asked ones, and return the latents
    the run then uses, so a saved voice holds exactly what this run used."""
    if not save_voices:
        return voice_inputs
    from .voices import encode_voices, save_voice

    latents = encode_voices(pipe, voice_inputs)
    for i, target in enumerate(save_voices):
        save_voice(pipe, voice_inputs[i], target, force=force, latents=latents[i])
        if not quiet:
            click.echo(f"Saved voice {voices[i]} -> {target}", err=True)
    return latents


def _generate(pipe, script, out, voices, voice_inputs, save_voices, force, player, quiet, options) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import generation as gen
    from .output import AudioWriter, DiskFullError

    voice_inputs = _save_voices(pipe, voices, voice_inputs, save_voices, force, quiet)
    bar = tqdm(unit="frame", desc="Generating", dynamic_ncols=True, file=sys.stderr, disable=quiet or None)
    last, writer, status = None, None, 0
    try:
        with logging_redirect_tqdm(), (out if isinstance(out, _StdoutWriter) else AudioWriter(out, force=force)) \
                as writer:
            for r in gen.stream_generate(pipe, script, voice_inputs, **options):
                if r.audio.size:
                    writer.write(r.audio)
                    if player is not None:
                        player.write(r.audio.reshape(-1, 1))
                    bar.set_postfix_str(f"{r.audio_seconds:.1f} s audio, {r.real_time_factor:.2f}x real time",
                                        refresh=False)
                    if not r.is_pause:
                        bar.update(1)
                last = r
    except Interrupted as e:
        status = e.status
    except DiskFullError as e:
        raise DiskFullError(f"{e}; nothing was written.") from None
    finally:
        bar.close()
    if writer is None or writer.frames == 0:
        if status:
            click.echo(f"Interrupted ({signal.Signals(status - 128).name}) before any audio was made; nothing was "
                       "written.", err=True)
            return status
        voice = "another preset" if getattr(pipe, "family", None) == REALTIME else "a voice sample"
        raise UserError("The model produced no audio for this script (see the warnings above); nothing was "
                        f"written. Try another --seed, {voice}, or rephrase the script.")
    if status:
        click.echo(f"Interrupted ({signal.Signals(status - 128).name}): kept the {writer.seconds:.2f} s made so far "
                   f"in {out} (seed {last.seed})", err=True)
        return status
    if last is not None and last.truncated and getattr(pipe, "family", None) == REALTIME:
        logger.warning("Cut short at --max-seconds." if "max_seconds" in options else "The text is longer than "
                       "VibeVoice-Realtime-0.5B's context (8192 positions): the rest was cut; speak it in parts.")
    if last is not None and not quiet:
        click.echo(f"Wrote {out}: {last.audio_seconds:.2f} s of audio in {last.elapsed:.1f} s "
                   f"({last.real_time_factor:.2f}x real time, peak memory {last.peak_memory_gb:.2f} GB, seed "
                   f"{last.seed})", err=True)
    return 0


def _generate_parts(pipe, parts, script, out, voices, voice_inputs, save_voices, force, player, quiet, options,
                    resume) -> int:
    """A split script: part by part into one file, resumable (longrun.py)."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .longrun import speak_parts

    voice_inputs = _save_voices(pipe, voices, voice_inputs, save_voices, force, quiet)
    bar = tqdm(unit="frame", desc="Generating", dynamic_ncols=True, file=sys.stderr, disable=quiet or None)
    start = time.perf_counter()
    try:
        with logging_redirect_tqdm():
            status, seconds, seed = speak_parts(pipe, parts, script, voices, voice_inputs, out, options, resume, force,
                                             bar, player)
    finally:
        bar.close()
    if status:
        return status
    if not out.exists():
        raise UserError("The model produced no audio for this script (see the warnings above); nothing was "
                        "written. Try another --seed, a voice sample, or rephrase the script.")
    elapsed = time.perf_counter() - start
    if not quiet:
        click.echo(f"Wrote {out}: {seconds:.2f} s of audio in {len(parts)} parts, {elapsed:.1f} s "
                   f"({seconds / elapsed if elapsed else 0:.2f}x real time, seed {seed})", err=True)
    return 0


def _stdin_pieces():
    """stdin's text as it arrives (`some-llm ... | vibevoice-mlx say --stdin`): UTF-8 decoded piece by piece, a
    character split between two reads waiting for its second half."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8-sig")()  # a byte-order mark is not text
    try:
        for data in iter(lambda: sys.stdin.buffer.read1(4096), b""):
            text = decoder.decode(data)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not UTF-8 text ({e.reason} at byte {e.start} of a read): give text.") from None
    if tail:
        yield tail


def _warn_speaker_labels(pieces):
    """The pieces as they are; a warning, once, when they look like a speaker script (this model has one voice)."""
    from .notices import warn_once
    from .processor import _BRACKET_RE, _SPEAKER_RE

    head = ""
    for piece in pieces:
        if head is not None:
            head += piece
            if any(_SPEAKER_RE.match(line.strip()) or _BRACKET_RE.match(line.strip()) for line in head.splitlines()):
                warn_once(logger, "The text looks like a speaker script (Speaker N: ...), but VibeVoice-Realtime-0.5B "
                          "speaks everything in its one voice, the labels included: give plain text.")
                head = None
            elif len(head) > 4096:  # looked far enough
                head = None
        yield piece


def _say_realtime(text, file, model, voices, save_voices, out, force, play, quiet, options, run) -> int:
    """`say` for VibeVoice-Realtime-0.5B: plain text (or pieces read from stdin as they arrive) in one voice preset.
    The voice is resolved and checked against the model's size before the weights load; options of the 1.5B/7B
    are refused."""
    from .generation import GenerationConfig
    from .loader import inspect, load
    from .preflight import check_memory, default_dtype_name
    from .preset_store import load_voice_preset, resolve_voice
    from .presets import PresetShape
    from .realtime_api import _one_voice
    from .text_stream import text_ids

    backend, device, dtype = options.pop("backend"), options.pop("device"), options.pop("dtype")
    attention, tokenizer = options.pop("attention"), options.pop("tokenizer")
    if backend == "torch":
        raise UserError("VibeVoice-Realtime-0.5B has no PyTorch implementation to run (transformers has none yet): "
                        "drop --backend torch.")
    other = [name for name, given in (("--temperature", options.pop("temperature") != 0.0),
                                      ("--top-p", options.pop("top_p") != 1.0), ("--save-voice", bool(save_voices)),
                                      ("--chunk", run["chunk"] != "auto"), ("--device", device != "auto"),
                                      ("--attention", attention != "auto")) if given]
    if other:
        raise UserError(f"{', '.join(other)}: only VibeVoice 1.5B/7B take this; VibeVoice-Realtime-0.5B chooses no "
                        "tokens, takes no voice audio and cuts a text past its context itself: leave it out.")
    script = _stdin_pieces() if file == "-" else _read_script(text, file)
    out = _checked_output(out, force, run)
    generate_options = {k: v for k, v in options.items() if v is not None}
    GenerationConfig(**generate_options)  # every option checked now, not after loading
    ckpt, config, tok, _ = inspect(model, tokenizer)
    voice = resolve_voice(_one_voice(voices))  # a name, .pt or .safetensors; audio and other sizes refused here
    load_voice_preset(voice, shape=PresetShape.from_config(config.raw))
    if not force:
        check_memory(ckpt, config, dtype or default_dtype_name(), config.max_positions)
    script = _warn_speaker_labels([script] if isinstance(script, str) else script)
    if run["dry_run"]:
        ids = text_ids(tok, "".join(script))
        click.echo(f"1 part: {len(ids)} text tokens in voice {_one_voice(voices)}; no weights loaded.")
        return 0
    player = _player() if play else None
    try:
        with _signals_interrupt(), redirect_stdout(sys.stderr) if isinstance(out, _StdoutWriter) else nullcontext():
            try:
                pipe = load(ckpt.folder, dtype=dtype, tokenizer=tokenizer)
            except Interrupted as e:
                click.echo(f"Interrupted ({e}) while loading the model; nothing was written.", err=True)
                return e.status
            return _generate(pipe, script, out, voices, [str(voice)], [], force, player, quiet, generate_options)
    finally:
        if player is not None:
            player.stop()
            player.close()


def _player():
    from .constants import SAMPLE_RATE

    try:
        import sounddevice
    except (ImportError, OSError):
        raise UserError("--play needs the audio output extra: pip install 'vibevoice-mlx[play]'") from None
    try:
        stream = sounddevice.OutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32")
        stream.start()
    except Exception as e:  # PortAudioError and friends: no device, busy device
        raise UserError(f"--play: no usable audio output device ({str(e).splitlines()[0]}); run without --play.") \
            from None
    return stream

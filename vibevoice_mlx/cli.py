"""The `vibevoice-mlx` command: convert, say, doctor.

Each command is a thin layer over a library function with the same keywords (kebab-case here). User errors
exit with one line and a non-zero status; library code logs and raises.
"""

import logging
import sys
from contextlib import contextmanager

import click

from .errors import UserError

logger = logging.getLogger("vibevoice_mlx")


class CLIError(click.ClickException):
    """One-line error for bad input: names the problem and the fix."""


@contextmanager
def user_errors():
    """A `UserError` from the library becomes a one-line message and exit 1; anything else is a bug and keeps its
    traceback."""
    try:
        yield
    except UserError as e:
        raise CLIError(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vibevoice-mlx")
@click.option("-v", "--verbose", count=True, help="More log output: -v debug, -vv the libraries' debug too.")
@click.option("-q", "--quiet", is_flag=True, help="Errors only: no warnings, no progress bar.")
@click.pass_context
def main(ctx, verbose, quiet):
    """Microsoft VibeVoice text-to-speech with MLX."""
    # Ours: info by default (what was loaded, converted, cut), -v debug; -vv also the libraries' debug logs.
    logging.basicConfig(format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    logging.getLogger().setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    from .blas import maybe_reexec_with_fast_blas

    maybe_reexec_with_fast_blas(sys.argv)  # Linux: the system's OpenBLAS instead of the wheel's reference BLAS
    ctx.obj = {"quiet": quiet, "verbose": verbose}


# --- convert (owned by the conversion stage) ---
@main.command()
@click.option("-m", "--model", required=True, help="PyTorch checkpoint: local folder or Hugging Face repo id.")
@click.option("--mlx-path", default="mlx_model", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write the MLX model to.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Storage dtype of the weights (what must stay float32 does).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model's linear layers.")
@click.option("--q-bits", default=4, show_default=True, type=click.Choice(["4", "8"]), help="Bits per weight.")
@click.option("--q-group-size", default=64, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Weights per quantization group.")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the checkpoint has no tokenizer files.")
@click.option("--force", is_flag=True, help="Replace --mlx-path if it exists.")
@click.option("--upload-repo", help="Hugging Face repo to upload the converted folder to.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin/.pt weights (with torch's weights-only loader).")
@click.option("--revision", help="Hub revision (branch, tag or commit) of --model.")
def convert(model, mlx_path, dtype, quantize, q_bits, q_group_size, tokenizer, force, upload_repo, allow_pickle,
            revision):
    """Convert a VibeVoice PyTorch checkpoint (original or transformers layout) to an MLX folder."""
    from .convert.convert import convert as run_convert

    with user_errors():
        run_convert(model, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
                    q_group_size=int(q_group_size), tokenizer=tokenizer, force=force, upload_repo=upload_repo,
                    allow_pickle=allow_pickle, revision=revision)


# --- doctor ---
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json):
    """Check this machine: platform, MLX backend, memory, torch, which model fits, what is missing."""
    import json

    from .doctor import doctor_report, format_report

    report = doctor_report()
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


# --- say ---


def _read_script(text, file):
    if file is not None:
        return file.read()
    if text:
        return text
    raise CLIError("No script: give the text as an argument or --file script.txt.")


@main.command()
@click.argument("text", required=False)
@click.option("-f", "--file", type=click.File("r", encoding="utf-8"), help="Read the script from a text file.")
@click.option("-m", "--model", default="microsoft/VibeVoice-1.5B", show_default=True,
              help="Converted MLX folder, PyTorch checkpoint folder, or Hugging Face repo id.")
@click.option("--voice", "voices", multiple=True,
              help="Voice sample (any audio file) or saved voice (.safetensors), one per speaker in speaker order.")
@click.option("--save-voice", "save_voices", multiple=True, type=click.Path(dir_okay=False),
              help="Save the encoded latents of the --voice at the same position, to reuse without re-encoding.")
@click.option("-o", "--output", default="output.wav", show_default=True, type=click.Path(dir_okay=False),
              help="Output file; the format follows the extension (wav, flac, ogg, mp3).")
@click.option("--steps", type=click.IntRange(1, 100), help="Diffusion steps (default: the model's, else 10).")
@click.option("--cfg-scale", type=float, help="Classifier-free guidance scale (default: the model's, else 1.3).")
@click.option("--seed", type=int, help="Seed for reproducible output.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0),
              help="0: greedy token choice (the original); above 0: sample among the control tokens.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--max-seconds", type=click.FloatRange(0, min_open=True), help="Stop after this much audio.")
@click.option("--backend", default="mlx", show_default=True, type=click.Choice(["mlx", "torch"]))
@click.option("--device", default="auto", show_default=True, help="torch backend: auto, mps, cuda or cpu.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Compute dtype (default: float16 on a GPU, float32 on the CPU).")
@click.option("--attention", default="auto", show_default=True, type=click.Choice(["auto", "sdpa", "eager"]),
              help="torch backend: attention implementation.")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the model folder has none.")
@click.option("--force", is_flag=True, help="Overwrite the output file (and saved voices).")
@click.option("--play", is_flag=True, help="Play while generating (needs: pip install 'vibevoice-mlx[play]').")
@click.pass_context
def say(ctx, text, file, model, voices, save_voices, output, force, play, **options):
    """Speak TEXT (or --file) into an audio file, writing it as the audio is produced."""
    from pathlib import Path

    from .audio import output_format
    from .processor import parse_script

    script = _read_script(text, file)
    out = Path(output)
    # Everything that can be checked before loading the model is, so bad input never leaves a file behind.
    with user_errors():
        parse_script(script)
        output_format(out)
    if out.exists() and not force:
        raise CLIError(f"{out} already exists; pass --force to overwrite it.")
    if len(save_voices) > len(voices):
        raise CLIError(f"{len(save_voices)} --save-voice paths for {len(voices)} --voice files: give one per voice.")
    for v in voices:
        if not Path(v).is_file():
            raise CLIError(f"Voice file not found: {v}")
    with user_errors():
        _run_say(script, out, model=model, voices=list(voices), save_voices=list(save_voices), force=force,
                 play=play, quiet=ctx.obj["quiet"], **options)


def _run_say(script, out, *, model, voices, save_voices, force, play, quiet, backend, device, dtype, attention,
             tokenizer, **generate_options):
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from . import generation as gen
    from .audio import AudioWriter
    from .convert.cache import model_folder
    from .loader import load
    from .voices import encode_voices, save_voice

    folder = model_folder(model, dtype=dtype, tokenizer=tokenizer) if backend == "mlx" else model
    pipe = load(folder, backend=backend, device=device, dtype=dtype, tokenizer=tokenizer, attention=attention)
    options = {k: v for k, v in generate_options.items() if v is not None}
    voice_inputs = list(voices)
    if save_voices:
        # Encode once, as the run does (one padded batch), so a saved voice holds exactly what this run uses.
        latents = encode_voices(pipe, voice_inputs)
        for i, target in enumerate(save_voices):
            save_voice(pipe, voices[i], target, force=force, latents=latents[i])
            click.echo(f"Saved voice {voices[i]} -> {target}", err=True)
        voice_inputs = latents
    player = _player() if play else None
    bar = tqdm(unit="frame", desc="Generating", dynamic_ncols=True, file=sys.stderr, disable=quiet or None)
    last, writer = None, None
    try:
        with logging_redirect_tqdm(), AudioWriter(out, force=force) as writer:
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
    except BaseException:
        if writer is not None and writer.frames == 0:
            out.unlink(missing_ok=True)  # nothing was made: leave nothing behind
        raise
    finally:
        bar.close()
        if player is not None:
            player.stop()
            player.close()
    if writer.frames == 0:
        out.unlink(missing_ok=True)
        raise UserError("The model produced no audio for this script (see the warnings above); nothing was "
                        "written. Try another --seed, a voice sample, or rephrase the script.")
    if last is not None:
        click.echo(f"Wrote {out}: {last.audio_seconds:.2f} s of audio in {last.elapsed:.1f} s "
                   f"({last.real_time_factor:.2f}x real time, peak memory {last.peak_memory_gb:.2f} GB)", err=True)


def _player():
    from .constants import SAMPLE_RATE

    try:
        import sounddevice
    except (ImportError, OSError):
        raise CLIError("--play needs the audio output extra: pip install 'vibevoice-mlx[play]'")
    stream = sounddevice.OutputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32")
    stream.start()
    return stream


# --- bench ---


@main.command()
@click.option("-m", "--model", required=True, help="Model folder or repo id (as for say).")
@click.option("--backends", default="mlx", show_default=True,
              help="Comma-separated, timed in this order; the last is the baseline of the ratios (e.g. mlx,torch).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Compute dtype.")
@click.option("--frames", default=16, show_default=True, type=click.IntRange(2), help="Frames timed per run.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(1), help="Frames not timed per run.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1, 100))
@click.option("--cfg-scale", default=1.3, show_default=True, type=float)
@click.option("--voice-seconds", default=3.0, show_default=True, type=click.FloatRange(0),
              help="Length of the synthetic voice prompt (0: no voice).")
@click.option("--script", default=None, help="Text to speak (default: one sentence).")
@click.option("--force-frames", is_flag=True, help="Make every step a frame (random-weight checkpoints).")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the model folder has none.")
def bench(model, backends, dtype, frames, runs, warmup, steps, cfg_scale, voice_seconds, script, force_frames,
          tokenizer):
    """Time generation per frame for each backend in one run and print the ratios."""
    from . import bench as b

    names = [n.strip() for n in backends.split(",") if n.strip()]
    bad = [n for n in names if n not in ("mlx", "torch")]
    if bad or not names:
        raise CLIError(f"Unknown backend(s) {bad or backends!r}: use mlx, torch or mlx,torch.")
    click.echo(f"machine: {b.machine()}")
    from .blas import describe as describe_blas

    click.echo(f"BLAS: {describe_blas()}")
    click.echo(f"model: {model}; {frames} frames x {runs} runs after {warmup} warm-up frames; {steps} steps, "
               f"cfg {cfg_scale}; voice {voice_seconds:g} s" + ("; forced frames" if force_frames else ""))
    results = []
    for name in names:
        with user_errors():
            r = b.run_backend(model=model, backend=name, dtype=dtype, script=script or b.DEFAULT_SCRIPT,
                              voice_seconds=voice_seconds, frames=frames, runs=runs, warmup=warmup, steps=steps,
                              cfg_scale=cfg_scale, force_frames=force_frames, tokenizer=tokenizer)
        results.append(r)
        click.echo(b.format_results([r]))
    if len(results) > 1:
        click.echo(b.format_results(results).splitlines()[-1])


def _register_extras():
    """Commands that live with their own part of the package."""
    from .comfyui.install import comfyui

    main.add_command(comfyui)


_register_extras()

if __name__ == "__main__":
    main()

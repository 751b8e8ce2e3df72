"""The `vibevoice-mlx` command: convert, say, doctor.

Each command is a thin layer over a library function with the same keywords (kebab-case here). User errors
exit with one line and a non-zero status; library code logs and raises.
"""

import logging
import sys

import click


class UserError(click.ClickException):
    """One-line error for bad input: names the problem and the fix."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vibevoice-mlx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose):
    """Microsoft VibeVoice text-to-speech with MLX."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


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
    from .convert.convert import ConversionError, convert as run_convert
    from .convert.dtypes import DtypeError
    from .convert.layouts import LayoutError
    from .hub import HubError
    from .loader import LoadError

    try:
        run_convert(model, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
                    q_group_size=int(q_group_size), tokenizer=tokenizer, force=force, upload_repo=upload_repo,
                    allow_pickle=allow_pickle, revision=revision)
    except (ConversionError, DtypeError, HubError, LayoutError, LoadError) as e:
        raise UserError(str(e)) from None



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
    raise UserError("No script: give the text as an argument or --file script.txt.")


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
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1, 100), help="Diffusion steps.")
@click.option("--cfg-scale", default=1.3, show_default=True, type=float, help="Classifier-free guidance scale.")
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
def say(text, file, model, voices, save_voices, output, steps, cfg_scale, seed, temperature, top_p, max_seconds,
        backend, device, dtype, attention, tokenizer, force, play):
    """Speak TEXT (or --file) into an audio file, writing it as the audio is produced."""
    from pathlib import Path

    from .audio import output_format
    from .processor import parse_script

    script = _read_script(text, file)
    out = Path(output)
    # Everything that can be checked before loading the model is, so bad input never leaves a file behind.
    try:
        parse_script(script)
        output_format(out)
    except ValueError as e:
        raise UserError(str(e))
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to overwrite it.")
    if len(save_voices) > len(voices):
        raise UserError(f"{len(save_voices)} --save-voice paths for {len(voices)} --voice files: give one per voice.")
    for v in voices:
        if not Path(v).is_file():
            raise UserError(f"Voice file not found: {v}")
    _run_say(script, model, voices, save_voices, out, steps, cfg_scale, seed, temperature, top_p, max_seconds,
             backend, device, dtype, attention, tokenizer, force, play)


def _run_say(script, model, voices, save_voices, out, steps, cfg_scale, seed, temperature, top_p, max_seconds,
             backend, device, dtype, attention, tokenizer, force, play):
    from tqdm import tqdm

    from . import generation as gen
    from .audio import AudioWriter, load_audio, normalize_voice, save_voice
    from .loader import LoadError, load

    try:
        pipe = load(model, backend=backend, device=device, dtype=dtype, tokenizer=tokenizer, attention=attention)
    except (LoadError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e))
    voice_inputs = list(voices)
    for i, target in enumerate(save_voices):
        audio = normalize_voice(load_audio(voices[i]))
        latents = gen.voice_latents(pipe, audio)
        try:
            save_voice(target, latents, {"num_samples": len(audio), "model": pipe.folder.name,
                                         "hop": pipe.hop_length}, force=force)
        except FileExistsError as e:
            raise UserError(str(e))
        click.echo(f"Saved voice {voices[i]} -> {target}", err=True)
    player = _player() if play else None
    bar = tqdm(unit="frame", desc="Generating", dynamic_ncols=True, file=sys.stderr)
    last, writer = None, None
    try:
        with AudioWriter(out, force=force) as writer:
            for r in gen.stream_generate(pipe, script, voice_inputs, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                         temperature=temperature, top_p=top_p, max_seconds=max_seconds):
                if r.audio.size:
                    writer.write(r.audio)
                    if player is not None:
                        player.write(r.audio.reshape(-1, 1))
                    bar.set_postfix_str(f"{r.audio_seconds:.1f} s audio, {r.real_time_factor:.2f}x real time",
                                        refresh=False)
                    if not r.is_pause:
                        bar.update(1)
                last = r
    except ValueError as e:
        if writer is not None and writer.frames == 0:
            out.unlink(missing_ok=True)  # nothing was made: leave nothing behind
        raise UserError(str(e))
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
    try:
        import sounddevice
    except (ImportError, OSError):
        raise UserError("--play needs the audio output extra: pip install 'vibevoice-mlx[play]'")
    stream = sounddevice.OutputStream(samplerate=24000, channels=1, dtype="float32")
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
        raise UserError(f"Unknown backend(s) {bad or backends!r}: use mlx, torch or mlx,torch.")
    click.echo(f"machine: {b.machine()}")
    click.echo(f"model: {model}; {frames} frames x {runs} runs after {warmup} warm-up frames; {steps} steps, "
               f"cfg {cfg_scale}; voice {voice_seconds:g} s" + ("; forced frames" if force_frames else ""))
    results = []
    for name in names:
        r = b.run_backend(model, name, dtype, script or b.DEFAULT_SCRIPT, voice_seconds, frames, runs, warmup,
                          steps, cfg_scale, force_frames, tokenizer)
        results.append(r)
        click.echo(b.format_results([r]))
    if len(results) > 1:
        click.echo(b.format_results(results).splitlines()[-1])


if __name__ == "__main__":
    main()

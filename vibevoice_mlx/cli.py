"""The `vibevoice-mlx` command: convert, say, doctor.

Each command is a thin layer over a library function with the same keywords (kebab-case here). User errors
exit with one line and a non-zero status; library code logs and raises.
"""

import logging
import sys

import click

from .errors import CLIError, user_errors

logger = logging.getLogger("vibevoice_mlx")


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

    maybe_reexec_with_fast_blas(sys.argv)  # Linux: the system's BLIS or OpenBLAS, not the wheel's reference BLAS
    ctx.obj = {"quiet": quiet, "verbose": verbose}


# --- convert (owned by the conversion stage) ---
@main.command()
@click.option("-m", "--model", required=True, help="PyTorch checkpoint: local folder or Hugging Face repo id.")
@click.option("--mlx-path", default="mlx_model", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write the MLX model to.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Storage dtype of the weights (what must stay float32 does).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize the language model's linear layers.")
@click.option("--q-bits", type=click.Choice(["4", "8"]), help="Bits per weight, with -q (default 4).")
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]),
              help="Weights per quantization group, with -q (default 64).")
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
        run_convert(model, mlx_path, dtype=dtype, quantize=quantize, q_bits=q_bits and int(q_bits),
                    q_group_size=q_group_size and int(q_group_size), tokenizer=tokenizer, force=force, upload_repo=upload_repo,
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


# --- voices ---
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def voices(as_json):
    """List the VibeVoice-Realtime-0.5B voice presets: known, downloaded, converted."""
    import json

    from .preset_store import format_presets, list_presets

    rows = list_presets()
    click.echo(json.dumps(rows, indent=2) if as_json else format_presets(rows))


# --- bench ---


def _int_list(text):
    try:
        return [int(x) for x in str(text).split(",") if x.strip()] if text else []
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


@main.command()
@click.option("-m", "--model", help="Model folder or repo id (as for say).")
@click.option("--random-weights", type=click.Choice(["1.5b", "7b", "realtime-0.5b"]),
              help="A real configuration with seeded random weights (built once into the cache; frames forced).")
@click.option("--voice", help="Voice preset of a realtime model (.safetensors, .pt or a preset name).")
@click.option("--backends", default="mlx", show_default=True,
              help="This package's backends, timed in this order; the last is the baseline of the ratios.")
@click.option("--compare", default="", help="Peers timed the way their users run them, on the same weights: "
              "torch (transformers' generate), mlx-audio (needs --peer-python). Comma-separated.")
@click.option("--torch-model", type=click.Path(file_okay=False), help="Transformers-layout folder for --compare "
              "torch (default: --model when it is one; --random-weights has one).")
@click.option("--peer-python", help="A Python that has mlx-audio, for --compare mlx-audio.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Compute dtype.")
@click.option("--q-bits", default="", help="Also time the language model quantized to these bits (e.g. 8,4).")
@click.option("--batch", default="", help="Also measure throughput with this many scripts at once (e.g. 1,2,4,8).")
@click.option("--frames", default=16, show_default=True, type=click.IntRange(2), help="Frames timed per run.")
@click.option("--runs", default=2, show_default=True, type=click.IntRange(1), help="Timed runs, after a warm-up.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(1), help="Untimed frames per run.")
@click.option("--steps", type=click.IntRange(1, 100), help="Diffusion steps [default: 10; realtime 5].")
@click.option("--cfg-scale", type=float, help="CFG scale [default: 1.3; realtime 1.5].")
@click.option("--voice-seconds", default=3.0, show_default=True, type=click.FloatRange(0),
              help="Length of the synthetic voice prompt (0: no voice).")
@click.option("--script", default=None, help="Text to speak (default: 'Speaker 0: Hello there.'; realtime: a "
              "long sentence).")
@click.option("--force-frames", is_flag=True, help="Make every step a frame (random-weight checkpoints).")
@click.option("--profile-frames", default=6, show_default=True, type=click.IntRange(0),
              help="Frames of the instrumented pass that splits a frame by stage (0: skip it).")
@click.option("--tokenizer", help="Tokenizer folder or repo id, when the model folder has none.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON at the end.")
def bench(model, random_weights, voice, backends, compare, torch_model, peer_python, dtype, q_bits, batch, frames, runs,
          warmup, steps, cfg_scale, voice_seconds, script, force_frames, profile_frames, tokenizer, as_json):
    """Time load, prefill, first audio and each frame by stage, beside this machine's memory-bandwidth floor."""
    from . import bench as b

    names = [n.strip() for n in backends.split(",") if n.strip()]
    bad = [n for n in names if n not in ("mlx", "torch")]
    if bad or not names:
        raise CLIError(f"Unknown backend(s) {bad or backends!r}: use mlx, torch or mlx,torch.")
    peers = [n.strip() for n in compare.split(",") if n.strip()]
    if any(p not in ("torch", "mlx-audio") for p in peers):
        raise CLIError(f"Unknown peer(s) in --compare {compare!r}: use torch, mlx-audio.")
    if "mlx-audio" in peers:
        if not peer_python:
            raise CLIError("--compare mlx-audio needs --peer-python <a python that has mlx-audio installed>.")
        from .bench_peers import check_peer_python

        problem = check_peer_python(peer_python)
        if problem:
            raise CLIError(problem)
    if (model is None) == (random_weights is None):
        raise CLIError("Give one of --model <folder> and --random-weights 1.5b|7b|realtime-0.5b.")
    settings = b.BenchSettings(frames=frames, runs=runs, warmup=warmup, steps=steps, cfg_scale=cfg_scale,
                               voice_seconds=voice_seconds, script=script,
                               force_frames=force_frames, profile_frames=profile_frames)

    def echo(doc, part):
        if not as_json:
            text = b.format_bench(doc, part)
            if text:
                click.echo(text)

    with user_errors():
        doc = b.run_bench(model, random_weights, tokenizer, names, peers, torch_model, peer_python, dtype,
                          _int_list(q_bits), _int_list(batch), settings, echo, voice)
    if as_json:
        click.echo(b.to_json(doc))


def _register_extras():
    """Commands that live with their own part of the package."""
    from .batch import batch
    from .comfyui.install import comfyui
    from .say import say
    from .server.cli import serve  # click only; FastAPI and uvicorn load when serve runs

    main.add_command(say)
    main.add_command(serve)
    main.add_command(comfyui)
    main.add_command(batch)


_register_extras()

if __name__ == "__main__":
    main()

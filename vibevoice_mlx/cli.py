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

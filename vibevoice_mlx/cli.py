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


if __name__ == "__main__":
    main()

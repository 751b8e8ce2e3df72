"""The error a user can fix. Everything raised as `UserError` (or a subclass) carries a one-line message naming
the problem and the fix; the CLI prints it without a traceback and the server answers it with a 400. Any other
exception is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input (script, voice, option, model folder, path): the message says what to do."""


class NumericsError(UserError):
    """Inf or NaN during generation. In float16 an activation overflowed (architecture.md §8); in a wider dtype
    the values came in already broken (the weights or an input)."""

    def __init__(self, what: str, dtype: str = "float16"):
        if dtype == "float16":
            fix = "a float16 overflow is the likely cause; run again with --dtype bfloat16 (dtype='bfloat16') or float32"
        else:
            fix = (f"in {dtype} this is no overflow: the model's weights hold inf/NaN values; convert or download the "
                   "model again")
        super().__init__(f"{what}: {fix}.")


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM during a run (raised by the command's signal handler); carries the exit status the shell
    expects (128 + signal). A BaseException, as KeyboardInterrupt is: the handler raises it wherever the main
    thread is, and an `except Exception` there (in this package or a library) must not swallow it."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


class OutputExistsError(UserError, FileExistsError):
    """An output that would overwrite a file (pass --force / force=True)."""


def exists_message(path, other: str = "name") -> str:
    """The one wording of "this output is already there" (output files, saved voices, converted folders)."""
    return f"{path} already exists: choose another {other} or pass --force (force=True) to replace it."


class MissingPathError(UserError, FileNotFoundError):
    """An input or output path that does not exist."""


# --- the command line's side ---------------------------------------------------------------------------------

import contextlib  # noqa: E402

import click  # noqa: E402


class CLIError(click.ClickException):
    """One-line error for bad input on the command line: names the problem and the fix (exit 1)."""


@contextlib.contextmanager
def user_errors():
    """A `UserError` from the library becomes a one-line message and exit 1; anything else is a bug and keeps
    its traceback."""
    try:
        yield
    except UserError as e:
        raise CLIError(str(e)) from None

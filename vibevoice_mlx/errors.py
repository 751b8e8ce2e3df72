"""The error a user can fix. Everything raised as `UserError` (or a subclass) carries a one-line message naming
the problem and the fix; the CLI prints it without a traceback and the server answers it with a 400. Any other
exception is a bug and keeps its traceback."""


class UserError(ValueError):
    """Bad input (script, voice, option, model folder, path): the message says what to do."""


class NumericsError(UserError):
    """Inf or NaN during generation: in float16, an activation overflowed (architecture.md §8)."""

    def __init__(self, what: str):
        super().__init__(f"{what}: a float16 overflow is the likely cause; run again with --dtype bfloat16 "
                         "(dtype='bfloat16') or float32.")


class OutputExistsError(UserError, FileExistsError):
    """An output that would overwrite a file (pass --force / force=True)."""


class MissingPathError(UserError, FileNotFoundError):
    """An input or output path that does not exist."""

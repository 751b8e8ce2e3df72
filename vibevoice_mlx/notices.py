"""Warnings about a run's input, said once per run of a command.

`say` checks its script and voices before the model loads, and generation reads them again, once per part of a
split script: the same warning would print two, five or forty times. Inside `once_per_run()` each warning is said
the first time only; outside it (the Python API, the server) every call warns, as a plain `logger.warning`.
"""

import logging
from contextlib import contextmanager
from typing import Hashable, Iterator, Optional, Set

_said: Optional[Set[Hashable]] = None  # the warnings said in the current run; None outside one


@contextmanager
def once_per_run() -> Iterator[None]:
    """Say each `warn_once` warning once until the block ends."""
    global _said
    outer, _said = _said, set()
    try:
        yield
    finally:
        _said = outer


def warn_once(logger: logging.Logger, msg: str, *args, key: Optional[Hashable] = None) -> None:
    """`logger.warning(msg, *args)`, unless this run said it already: the same text, or the same `key` where the
    text differs for one fact (a voice named by its file, then by its position)."""
    if _said is not None:
        key = (logger.name, (msg % args if args else msg) if key is None else key)
        if key in _said:
            return
        _said.add(key)
    logger.warning(msg, *args, stacklevel=2)

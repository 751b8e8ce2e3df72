"""Errors as the OpenAI API sends them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

import logging
import re
from typing import Dict, Optional

logger = logging.getLogger(__name__)

# An absolute path's folders: "/srv/voices/" of "/srv/voices/alice.safetensors" (not "and/or", nor a bare "/x").
_FOLDERS = re.compile(r"(?<![\w.~])/(?:[^\s'\"/]+/)+(?=[^\s'\"/])")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 411: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          503: "server_error"}


class APIError(Exception):
    """An error answered to the client; `headers` go with it (Retry-After, WWW-Authenticate)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> Dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def hide_paths(message: str, files: Optional[Dict[str, str]] = None) -> str:
    """A library's message as a client may see it: each server file in `files` named as the client knows it
    (quoted once), and every other absolute path cut to its last part. Where the server keeps its files is none
    of the client's business."""
    for path, name in (files or {}).items():
        for form in (f"'{path}'", f'"{path}"', path):
            message = message.replace(form, repr(name))
    return _FOLDERS.sub("", message)


def from_generation_error(exc: BaseException) -> APIError:
    """What a failure inside generation becomes: the library's user errors are 400, anything else 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return APIError(400, hide_paths(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__,
                        code="invalid_input")
    logger.error("Generation failed", exc_info=(type(exc), exc, exc.__traceback__))
    return APIError(500, f"Generation failed ({type(exc).__name__}); the server log has the details.",
                    code="generation_failed")

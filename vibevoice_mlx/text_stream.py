"""The realtime model's text input, whole or in pieces: text in, token ids out (realtime.md §2, §6).

The realtime processor's ids are `encode(text.strip() + "\\n")` with the Qwen2.5 tokenizer, no special tokens added.
`text_ids` computes them for a whole text. `TextStream` computes them for a text that arrives in pieces (a language
model's token stream, stdin): it gives out the ids no later text can change, so speech for a window can start as
soon as its text is known, and the ids it gives out are exactly those of the whole text, whatever the piece
boundaries (realtime.md §6.1: then the audio is the whole-text run's too). `text_source` connects either to the
window loop, `windows.windows`.

Both paths read text through `clean` and the same `plain_tokenizer`, so they agree on every input. The one deviation
from the original: added-token strings in the text (`<|im_end|>`, `<|image_pad|>`, `<tool_call>`, ...) are encoded
as the plain characters they are, where the original turns them into control ids (realtime.md pitfall 33). User
text must not inject control tokens, and a partial one at a piece boundary would break the rule of §6.2. Texts
without such strings get the original's ids.
"""

import codecs
import json
import unicodedata
from functools import lru_cache
from typing import Callable, Iterable, List, Optional, Tuple, Union

from tokenizers import Tokenizer

from .errors import UserError
from .windows import TextIds

Piece = Union[str, bytes]
Wait = Callable[[TextIds, int], None]

# The file demo's substitutions (realtime.md §2; the web demo replaces only the first): one character for one, so
# they apply to pieces as they do to the whole text.
QUOTES = str.maketrans({"\u2019": "'", "\u201c": '"', "\u201d": '"'})


def clean(text: str) -> str:
    """The character substitutions applied before tokenizing (curly quotes to ASCII)."""
    return text.translate(QUOTES)


@lru_cache(maxsize=8)
def plain_tokenizer(tokenizer) -> Tokenizer:
    """`tokenizer` (a transformers fast tokenizer or a `tokenizers.Tokenizer`) without its added tokens, so their
    strings in a text are plain characters."""
    spec = json.loads(getattr(tokenizer, "backend_tokenizer", tokenizer).to_str())
    if spec.get("pre_tokenizer") is None:
        raise UserError("The text tokenizer has no pre-tokenizer: the realtime model needs its Qwen2.5 tokenizer.")
    spec["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(spec))


def _encode(plain: Tokenizer, text: str) -> List[int]:
    return plain.encode(text, add_special_tokens=False).ids


def text_ids(tokenizer, text: str) -> List[int]:
    """The realtime processor's ids of a whole text (realtime.md §2): at least one, since "" gives "\\n"."""
    return _encode(plain_tokenizer(tokenizer), clean(text).strip() + "\n")


class TextStream:
    """`text_ids` for a text that arrives in pieces: `feed` each piece, then `close`; `ids` are the final ids.

    Pieces are str, or bytes of UTF-8 split anywhere (a character split across pieces is decoded when complete).
    The rule of realtime.md §6.2: of the text received so far (left-stripped, normalized as the tokenizer does), the
    last pre-token that holds a non-space character and the whitespace after it stay pending; the ids of everything
    before are final. BPE never merges across pre-tokens, and later text can change only that last pre-token, while
    the end of the text can still strip the whitespace and merge final punctuation with the newline (".\\n" is one
    id). At `close` the whole text is encoded as `text_ids` does, and the ids given out must be its prefix.
    """

    def __init__(self, tokenizer):
        self.tokenizer = plain_tokenizer(tokenizer)
        self.ids: List[int] = []
        self.closed = False
        self._parts: List[str] = []  # the text received, as decoded
        self._pending = ""  # normalized text after the final part
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    @property
    def text(self) -> str:
        """Everything received so far."""
        return "".join(self._parts)

    def feed(self, piece: Piece) -> List[int]:
        """Add a piece of text; returns the ids it made final (often none)."""
        if self.closed:
            raise ValueError("feed after close")
        text = self._decode(piece)
        self._parts.append(text)
        pending = self._pending + clean(text)
        if not self.ids:
            pending = pending.lstrip()
        normalizer = self.tokenizer.normalizer
        pending = normalizer.normalize_str(pending) if normalizer else pending
        cut = self._final_length(pending)
        new = _encode(self.tokenizer, pending[:cut]) if cut else []
        self._pending = pending[cut:]
        self.ids.extend(new)
        return new

    def close(self) -> List[int]:
        """The text has ended: returns the remaining ids of the whole text's `text_ids`."""
        if not self.closed:
            self._parts.append(self._decode(b"", final=True))
            self.closed = True
        whole = _encode(self.tokenizer, clean(self.text).strip() + "\n")
        if whole[: len(self.ids)] != self.ids:
            raise RuntimeError(f"internal error: the streamed ids {self.ids} are not a prefix of the whole text's "
                               f"{whole} (text {self.text!r})")
        new, self.ids = whole[len(self.ids):], whole
        return new

    def _decode(self, piece: Piece, final: bool = False) -> str:
        if isinstance(piece, str):
            if self._utf8.getstate()[0]:
                raise UserError("A text piece arrived in the middle of a UTF-8 character split across byte pieces: "
                                "send either str pieces or bytes pieces.")
            return piece
        if not isinstance(piece, (bytes, bytearray)):
            raise UserError(f"Text pieces must be str or UTF-8 bytes, not {type(piece).__name__}.")
        try:
            return self._utf8.decode(bytes(piece), final)
        except UnicodeDecodeError as e:
            raise UserError(f"The text input is not valid UTF-8 ({e.reason}): send UTF-8 text.") from None

    def _final_length(self, text: str) -> int:
        """How many leading characters of the pending, normalized `text` have final ids."""
        starts = [s for _, (s, e) in self.tokenizer.pre_tokenizer.pre_tokenize_str(text) if not text[s:e].isspace()]
        # NFC may compose later combining marks into the character before a pre-token that starts with one.
        while starts and unicodedata.combining(text[starts[-1]]):
            starts.pop()
        return starts[-1] if starts else 0


def text_source(tokenizer, text: Union[str, bytes, Iterable[Piece]]) -> Tuple[TextIds, Optional[Wait]]:
    """The ids and the `wait` for `windows.windows(session, ids, noise, wait=wait)`.

    A whole text (str) gives closed ids and no wait. An iterable of pieces (str or UTF-8 bytes; a bytes object is
    one piece) gives ids that grow as the window loop needs them: `wait` pulls pieces (blocking as the iterable
    does) until the window's ids are final or the pieces have ended (realtime.md §6.3).
    """
    if isinstance(text, str):
        return TextIds(text_ids(tokenizer, text), closed=True), None
    stream, pieces, end = TextStream(tokenizer), iter([text] if isinstance(text, bytes) else text), object()

    def wait(ids: TextIds, needed: int) -> None:
        while len(ids.ids) < needed and not ids.closed:
            piece = next(pieces, end)
            if piece is end:
                ids.extend(stream.close())
                ids.close()
            else:
                ids.extend(stream.feed(piece))

    return TextIds(), wait

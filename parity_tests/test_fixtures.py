"""The committed tiny fixture is what the seeded builder makes, and its torch-free transformers layout is what the
builder (through transformers' own VibeVoice) makes for that layout."""

import filecmp

from vibevoice_mlx.fixtures import build, transformers_layout
from vibevoice_mlx.testing import COMMITTED_TINY


def _same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


def test_rebuilding_the_committed_fixture_gives_the_same_bytes(tmp_path):
    built = build(tmp_path / "tiny", "tiny")
    for name in ("original", "tokenizer"):
        assert _same_files(COMMITTED_TINY / name, built[name]) == [], name
    derived = transformers_layout(COMMITTED_TINY / "original", tmp_path / "derived", COMMITTED_TINY / "tokenizer")
    assert _same_files(built["transformers"], derived) == []

"""The one key table against every tensor of the real 1.5B and 7B checkpoints (reference tables)."""

import gzip
from pathlib import Path

import pytest

from vibevoice_mlx.keys import (
    mlx_transpose,
    original_to_transformers,
    torch_transpose,
    transformers_to_original,
)

DATA = Path(__file__).parent / "data"


def _rows(size):
    with gzip.open(DATA / f"weight-keys-{size}.tsv.gz", "rt") as f:
        for line in f:
            if line.startswith("#") or line.startswith("original_key"):
                continue
            orig, tf, shape, transform = line.rstrip("\n").split("\t")
            yield orig, tf, shape, transform


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_key_table_covers_real_checkpoints(size):
    rows = list(_rows(size))
    assert len(rows) == 1205
    assert len({o for o, *_ in rows}) == 1205
    for orig, tf, _, _ in rows:
        assert original_to_transformers(orig) == tf, orig
        assert transformers_to_original(tf) == orig, tf


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_transposes_by_name(size):
    counts = {None: 0, (0, 2, 1): 0, (1, 2, 0): 0}
    for orig, _, shape, transform in _rows(size):
        expected = None if transform == "-" else tuple(int(i) for i in transform.split()[0][10:-1].split(","))
        perm = mlx_transpose(orig)
        assert perm == expected, orig
        counts[perm] += 1
        if perm is not None:
            inv = torch_transpose(orig)
            assert tuple(perm[i] for i in inv) == (0, 1, 2)
    # architecture.md §4.5: 96 conv weights, 6 transposed-conv weights per model
    assert counts[(0, 2, 1)] == 96 and counts[(1, 2, 0)] == 6

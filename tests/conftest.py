import importlib.util
import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run: a CI failure reproduces, and CI never flakes on a new draw.
settings.register_profile("repeatable", derandomize=True, deadline=None)
settings.load_profile("repeatable")

from vibevoice_mlx.testing import COMMITTED_TINY, tiny_checkpoint

HAS_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def pytest_collection_modifyitems(config, items):
    """`needs_torch` tests run where the torch extra is installed. Without it they are skipped, saying so;
    in CI (CI=true), where the README's test command installs it, a missing torch fails them instead."""
    if HAS_TORCH or os.environ.get("CI"):
        return  # in CI they run, and fail if torch is missing
    skip = pytest.mark.skip(reason="needs the torch extra: pip install -e '.[torch,test]'")
    for item in items:
        if "needs_torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The seeded tiny checkpoint in both layouts: {'original', 'transformers', 'tokenizer'} -> folder."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), committed=COMMITTED_TINY)

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


@pytest.fixture
def read_only_folder(tmp_path, monkeypatch):
    """A folder nothing can be written in, for root too (CI runs as root, which ignores permission bits): a
    tmpfs mounted read-only where this process may mount, else the permission bits; as root without mount
    rights, `os.access` answers as for anyone else (the pre-checks are then what is tested)."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    (folder / "existing.txt").write_text("x")
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if mounted:
        (folder / "existing.txt").write_text("x")
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, capture_output=True)
    else:
        folder.chmod(0o555)
        if os.geteuid() == 0:
            real_access = os.access
            inside = lambda p: str(p) == str(folder) or str(p).startswith(str(folder) + os.sep)  # noqa: E731
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if inside(p) and mode & os.W_OK
                                else real_access(p, mode, **kw))
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)

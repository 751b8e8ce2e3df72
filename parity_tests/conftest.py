import pytest

from vibevoice_mlx.testing import COMMITTED_TINY, tiny_checkpoint


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the full-size (1.5B, random weights) parity")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="full-size parity is opt-in: pytest parity_tests --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The seeded tiny checkpoint in both layouts: {'original', 'transformers', 'tokenizer'} -> folder."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), committed=COMMITTED_TINY)

import pytest

from vibevoice_mlx.testing import tiny_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The seeded tiny checkpoint in both layouts: {'original', 'transformers', 'tokenizer'} -> folder."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))

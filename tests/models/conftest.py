import pytest

import embedded as emb


@pytest.fixture(scope="module")
def tiny():
    """A seeded 2-layer Llama (vocabulary 256, hidden 64), built once per test module."""
    return emb.tiny_llama(vocab=256, hidden=64, layers=2)

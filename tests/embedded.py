"""Shared, load-once access to the embedded SmolLM2-135M model for the model tests.

Every test module that needs the real model asks for the ``embedded`` fixture defined in it as
``embedded = embedded_fixture()``; the load itself (GGUF the first time, then the safetensors
cache) happens once per test session thanks to the cache below.
"""
import functools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never touch the network

import pytest
import torch


@functools.lru_cache(maxsize=1)
def load():
    from qlab.models import load_model

    model, tokenizer = load_model()
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def windows(seq_len: int = 128, n: int = 2) -> torch.Tensor:
    """``n`` evaluation windows of ``seq_len`` tokens (evaluation articles, seed 0)."""
    from qlab.models.data import wikitext2_windows

    return wikitext2_windows(load()[1], "evaluation", seq_len, n, pick="spread")


def tiny_llama(vocab: int = 256, hidden: int = 64, layers: int = 2, tied: bool = True, seed: int = 0):
    """A random 2-layer Llama with the embedded model's layout (9:3 heads scaled down), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def embedded():
    return load()

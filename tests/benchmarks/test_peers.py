"""The qlab side of the peer comparison (qlab.benchmarks.peers): peer weights land on the right modules,
and, when the peers' venv is there (``make ptq-peers``), bitsandbytes' NF4 agrees bit for bit with qlab's."""
import os
from pathlib import Path

import pytest
import torch

from qlab.benchmarks import peers
from qlab.core.quant import fake_quant


@pytest.fixture(scope="module")
def tiny():
    """A 2-layer Llama with random weights (seeded), tied embeddings like the embedded model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_block_linears_are_the_quantized_set(tiny):
    names = peers.block_linear_names(tiny)
    assert len(names) == 2 * 7 and all(n.startswith("model.layers.") for n in names)
    assert "lm_head" not in names


def test_load_peer_weights_puts_each_weight_on_its_module(tiny):
    weights = {n: fake_quant(tiny.get_parameter(n + ".weight").detach(), "int4-g32") for n in peers.block_linear_names(tiny)}
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    loaded = peers.load_peer_weights(tiny, weights)
    for name, w in weights.items():
        assert torch.equal(loaded.get_parameter(name + ".weight"), w)
    assert torch.equal(loaded.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied, still float
    for k, v in tiny.state_dict().items():  # the input model is left untouched
        assert torch.equal(v, before[k]), k
    # the logits change exactly as a qlab fake-quant model's do
    from qlab.models.walker import quantize_model, weight_only

    ours, _ = quantize_model(tiny, weight_only("int4-g32"))
    ids = torch.arange(12)[None] % 96
    assert torch.equal(loaded(ids).logits, ours(ids).logits)


def test_load_peer_weights_rejects_partial_or_misnamed(tiny):
    names = peers.block_linear_names(tiny)
    weights = {n: tiny.get_parameter(n + ".weight").detach().clone() for n in names}
    with pytest.raises(ValueError, match="missing"):
        peers.load_peer_weights(tiny, {k: v for k, v in weights.items() if k != names[3]})
    with pytest.raises(ValueError, match="unexpected"):
        peers.load_peer_weights(tiny, weights | {"lm_head": tiny.lm_head.weight})
    gate = next(n for n in names if n.endswith("gate_proj"))  # [128, 64]: its transpose is a wrong shape
    with pytest.raises(ValueError, match="shape"):
        peers.load_peer_weights(tiny, weights | {gate: weights[gate].t()})


def test_peer_bits_per_weight():
    assert peers.peer_bits_per_weight("llmcompressor-gptq", 4, 64, True) == 4 + 16 / 64
    assert peers.peer_bits_per_weight("llmcompressor-gptq", 4, 128, False) == 4 + 20 / 128
    assert peers.peer_bits_per_weight("bnb-nf4", 4, 64, True) == 4.5
    assert peers.peer_bits_per_weight("unknown", 4, 64, True) is None


PEER_PYTHON = peers.DEFAULT_PEER / "bin" / "python"
needs_peer = pytest.mark.skipif(not PEER_PYTHON.exists(), reason=f"no peer venv at {peers.DEFAULT_PEER} (make ptq-peers)")


@needs_peer
def test_bitsandbytes_nf4_matches_qlab_nf4_bit_for_bit(tiny, tmp_path):
    """bitsandbytes quantize_4bit/dequantize_4bit (NF4, blocks of 64, fp32 absmax), run by peer_ptq.py
    in the peers' venv, equals qlab's fake_quant(W, 'nf4-sfp32') exactly; with qlab's default fp16
    scales the two differ (the scale rounding moves some values)."""
    tiny.save_pretrained(tmp_path / "model")
    weights, result = peers.PeerRun(PEER_PYTHON, "bnb-nf4", 4, 64).run(tmp_path / "model", None, threads=1)
    assert result["versions"]["bitsandbytes"] and set(weights) == set(peers.block_linear_names(tiny))
    exact = peers.weight_difference(weights, tiny, "nf4-sfp32")
    assert exact["max_abs_diff"] == 0.0 and exact["n_differ"] == 0
    assert peers.weight_difference(weights, tiny, "nf4")["n_differ"] > 0

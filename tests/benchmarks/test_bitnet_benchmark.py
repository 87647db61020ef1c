"""The BitNet scaling benchmark (qlab.benchmarks.bitnet): the vocabulary cut by hand, the article split, a
two-step run of both arms whose ternary layers the kernel reproduces, the trit bytes, ternary PTQ."""
import math

import pytest
import torch

from qlab.benchmarks import bitnet
from qlab.methods.train import BitLinear


def test_top_vocab_by_hand():
    v = bitnet.TopVocab(torch.tensor([7, 7, 7, 3, 3, 9, 9, 9, 9]), 3)  # counts: 9 x4, 7 x3, 3 x2
    assert v(torch.tensor([9, 7, 3, 100, 0])).tolist() == [0, 1, 2, 2, 2]  # 3, 100 and 0 are <unk> = 2
    with pytest.raises(ValueError, match="at least 2 ids"):
        bitnet.TopVocab(torch.tensor([1, 2]), 1)


def test_article_split_is_by_whole_article_and_disjoint():
    train, heldout, text = bitnet.article_split()
    assert "54 articles" in text and "8 articles" in text
    assert train.count("\n = ") + train.startswith(" = ") >= 54 and heldout not in train

    def heads(text):  # the level-1 article headings: the two parts share none
        return {line for line in text.split("\n") if line.startswith(" = ") and not line.startswith(" = = ")}

    assert heads(train) and heads(heldout) and not heads(train) & heads(heldout)


def test_tiny_llama_parameter_count_by_hand():
    m = bitnet.tiny_llama(bitnet.VOCAB, *bitnet.SIZES["S"])  # hidden 64, 2 layers
    assert m.config.intermediate_size == 192 and m.config.tie_word_embeddings  # 64 * round(8 * 64 / 3 / 64)
    linears = 64 * 64 * 2 + 32 * 64 * 2 + 192 * 64 * 3  # q, o; k, v (one KV head of 32); gate, up, down
    assert bitnet.block_params(m) == 2 * (linears + 2 * 64) + 64 == 98624  # + two norms a layer, final norm
    assert sum(p.numel() for p in m.parameters()) == 98624 + bitnet.VOCAB * 64  # one tied embedding


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 64, (16, 16), generator=g)
    heldout = torch.randint(0, 64, (4, 16), generator=g)
    rows = {}
    for arm in ("float", "b1.58"):
        run = bitnet.BitNetRun("S", arm, steps=2, batch=4, seq_len=16, warmup=1, vocab=64)
        rows[arm] = bitnet.run_one(run, train, heldout, tmp_path_factory.mktemp(arm), progress=False)
    return rows


def test_both_arms_train_and_the_ternary_kernel_reproduces_the_bitlinears(trained):
    f, b = trained["float"], trained["b1.58"]
    assert len(f["losses"]) == len(b["losses"]) == 2
    assert f["losses"][0] == pytest.approx(math.log(64), rel=0.1)  # an untrained model: about uniform
    assert b["kernel_rel_diff"] < 1e-5  # the kernel multiplies by gamma after the sum: fp32 rounding only
    assert b["block_params"] > f["block_params"]  # the extra RMSNorm gain of every BitLinear


def test_trit_bytes_are_a_fifth_and_a_quarter_of_the_weights(trained):
    b = trained["b1.58"]
    # per layer (hidden 64, 2 heads of 32, 1 KV head, SwiGLU 192): q, o 64x64; k, v 32x64; gate, up, down 192x64
    per_layer = [64 * 64, 32 * 64, 32 * 64, 64 * 64, 192 * 64, 192 * 64, 64 * 192]
    assert b["ternary_weights"] == 2 * sum(per_layer) == 98304
    assert b["bytes_2bit"] == 98304 // 4 == 24576  # every layer's count divides by 4
    assert b["bytes_5trit"] == 2 * sum(-(-n // 5) for n in per_layer) == 19668  # ceil per layer
    assert b["bytes_5trit"] / b["bytes_2bit"] == pytest.approx(0.8, abs=1e-3)  # 1.6 bits vs 2


def test_ternary_ptq_puts_every_block_linear_on_three_levels():
    m = bitnet.tiny_llama(64, 64, 1)
    q = bitnet.ternary_ptq(m)
    for name, layer in q.named_modules():
        if type(layer) is torch.nn.Linear and name.startswith("model.layers."):
            w = layer.weight.detach()
            levels = w.unique()
            assert len(levels) == 3
            gamma = m.get_submodule(name).weight.detach().abs().mean()
            assert torch.allclose(levels[levels != 0].abs(), gamma.expand(int((levels != 0).sum())), rtol=1e-3)
    assert torch.equal(q.model.embed_tokens.weight, m.model.embed_tokens.weight)  # embedding untouched


def test_bitnet_model_uses_bitlinear_in_the_blocks_only():
    m = bitnet.build(bitnet.BitNetRun("S", "b1.58", vocab=64))
    kinds = {type(mod) for n, mod in m.named_modules()
             if n.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)}
    assert kinds == {BitLinear} and type(m.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="arm must be"):
        bitnet.build(bitnet.BitNetRun("S", "int4"))

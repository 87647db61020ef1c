"""Greedy generation through each quantized cache next to the float cache (qlab.eval.generation).

References: transformers' own ``generate`` with its float cache, token by token by hand (argmax of the logits of
a forward pass over the whole text so far, no cache at all), and a float window wider than the text, which must
give the float run exactly.
"""
import pytest
import torch

from embedded import embedded, tiny_llama  # noqa: F401  (session fixture)
from qlab.eval.generation import compare_generations, first_divergence, greedy, summary
from qlab.methods.kv.cache import FP8, GEAR, KIVI, QuantizedKVCache

METHODS = {"fp8-token": FP8(), "fp8-tensor": FP8("tensor", k_scale=0.01, v_scale=0.002), "kivi4": KIVI(4, 4, 8),
           "kivi2": KIVI(2, 4, 0), "ktoken2": KIVI(2, 4, 0, keys="token"), "gear2": GEAR(2, 4, 4),
           "gear2-Q": GEAR(2, 4, 4, use_sparse=False, use_lowrank=False), "wide window": KIVI(2, 4, 64)}


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_first_divergence():
    assert first_divergence(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])) is None
    assert first_divergence(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])) == 0
    with pytest.raises(ValueError, match="equal length"):
        first_divergence(torch.tensor([1, 2]), torch.tensor([1, 2, 3]))


def test_summary_by_hand():
    import pandas as pd

    df = pd.DataFrame({"method": ["a", "a", "b"], "first_divergence": [3, None, 0], "agreement": [0.5, 1.0, 0.25],
                       "tokens": [[0] * 8] * 3})
    table = summary(df)
    assert table.loc["a"].tolist() == [0.75, 3, 5.5] and table.loc["b"].tolist() == [0.25, 0, 0]  # None counts as 8


@torch.no_grad()
def test_float_greedy_is_argmax_by_hand(model):
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    text = ids
    for _ in range(10):
        text = torch.cat([text, model(text, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    from transformers import DynamicCache

    assert torch.equal(greedy(model, ids, DynamicCache(), 10), text[0, 6:])


def test_every_method_generates_and_is_compared(model):
    prompts = [torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))]
    df = compare_generations(model, None, prompts, METHODS, max_new_tokens=24)
    assert len(df) == 1 + len(METHODS) and (df["tokens"].map(len) == 24).all()
    for p in (0,):
        rows = df[df.prompt == p].set_index("method")
        reference = torch.tensor(rows.loc["float", "tokens"])
        assert rows.loc["float", "first_divergence"] is None and rows.loc["float", "agreement"] == 1
        assert rows.loc["wide window", "tokens"] == rows.loc["float", "tokens"]  # R = 64 > 34 tokens: no quantization
        for label, method in METHODS.items():  # the row is what a fresh cache of this method generates
            again = greedy(model, prompts[p], QuantizedKVCache(method, model.config), 24)
            assert torch.equal(again, torch.tensor(rows.loc[label, "tokens"])), label
            assert rows.loc[label, "agreement"] == pytest.approx(float((again == reference).float().mean()))
            assert rows.loc[label, "first_divergence"] == first_divergence(again, reference)
    table = summary(df)
    assert table.loc["float", "agreement"] == 1 and table.loc["float", "earliest"] == 24
    with pytest.raises(ValueError, match="method config"):
        compare_generations(model, None, prompts, {"bad": "kivi"}, 4)
    with pytest.raises(ValueError, match="need a tokenizer"):
        compare_generations(model, None, ["text"], {}, 4)


@pytest.mark.model
def test_embedded_generations(embedded):
    """SmolLM2 continues one prompt for 12 tokens: FP8 per token follows the float text; KIVI-2 with per-token keys
    and no float window parts from it earlier than KIVI-2 with per-channel keys and a window of 32."""
    model, tokenizer = embedded
    caches = {"fp8": FP8(), "kivi2": KIVI(2, 32, 32), "ktoken2-r0": KIVI(2, 32, 0, keys="token")}
    df = compare_generations(model, tokenizer, ["The Roman Empire was"], caches, max_new_tokens=12)
    rows = df.set_index("method")
    assert rows.loc["fp8", "agreement"] >= 0.75
    assert isinstance(rows.loc["float", "text"], str) and len(rows.loc["float", "text"]) > 20
    assert rows.loc["ktoken2-r0", "agreement"] <= rows.loc["kivi2", "agreement"]

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlab.models.transforms import fold_into_linear, fold_into_norm, llama_scaling_groups


def tiny_llama(kv_heads: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    for name, p in model.named_parameters():  # non-trivial norm weights, so folding really changes them
        if "norm" in name:
            p.data = torch.rand_like(p) + 0.5
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])  # 2: grouped-query attention, v_proj -> o_proj not foldable
def test_folding_preserves_the_model_function(kv_heads):
    model = tiny_llama(kv_heads)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(tokens).logits
    g = torch.Generator().manual_seed(2)
    n_folds = 0
    for layer in model.model.layers:
        for prev, linears, fold in llama_scaling_groups(layer):
            s = torch.exp(torch.randn(linears[0].in_features, generator=g))  # scales from ~0.1 to ~10
            fold(prev, linears, s)
            n_folds += 1
    assert n_folds == 2 * (4 if kv_heads == 4 else 3)
    with torch.no_grad():
        after = model(tokens).logits
    assert torch.allclose(after, before, atol=1e-4, rtol=1e-4)
    # and the weights really moved
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, torch.ones(64))


def test_fold_by_hand():
    norm = torch.nn.RMSNorm(2)
    norm.weight.data = torch.tensor([1.0, 2.0])
    lin = torch.nn.Linear(2, 1, bias=False)
    lin.weight.data = torch.tensor([[3.0, 4.0]])
    fold_into_norm(norm, [lin], torch.tensor([1.0, 4.0]))
    assert torch.equal(norm.weight.data, torch.tensor([1.0, 0.5]))
    assert torch.equal(lin.weight.data, torch.tensor([[3.0, 16.0]]))
    prev = torch.nn.Linear(1, 2)
    prev.weight.data, prev.bias.data = torch.tensor([[2.0], [8.0]]), torch.tensor([4.0, 4.0])
    fold_into_linear(prev, [lin], torch.tensor([2.0, 4.0]))
    assert torch.equal(prev.weight.data, torch.tensor([[1.0], [2.0]]))
    assert torch.equal(prev.bias.data, torch.tensor([2.0, 1.0]))
    assert torch.equal(lin.weight.data, torch.tensor([[6.0, 64.0]]))


def test_bad_scales():
    norm, lin = torch.nn.RMSNorm(3), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="positive"):
        fold_into_norm(norm, [lin], torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="one scale per channel"):
        fold_into_norm(norm, [lin], torch.ones(4))
    with pytest.raises(ValueError, match="cannot follow"):
        fold_into_norm(norm, [torch.nn.Linear(4, 2)], torch.ones(3))

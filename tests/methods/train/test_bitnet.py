"""BitLinear against the BitNet b1.58 note's reference code, a tiny training run, and 5-trits-per-byte packing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlab.core.packing import pack, unpack
from qlab.core.quant import quantize
from qlab.kernels.ternary import TernaryWeight, ternary_matmul
from qlab.methods.train import BitLinear, bitnet_model, pack_trits, train, unpack_trits


# ---- the reference: "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (Ma et al. 2024), its BitLinear ----
def activation_quant(x):
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    return (x * scale).round().clamp_(-128, 127) / scale


def weight_quant(w):
    scale = 1.0 / w.abs().mean().clamp_(min=1e-5)
    return (w * scale).round().clamp_(-1, 1) / scale


def reference_forward(layer: BitLinear, x):
    x_norm = layer.norm(x)
    x_quant = x_norm + (activation_quant(x_norm) - x_norm).detach()
    w_quant = layer.weight + (weight_quant(layer.weight) - layer.weight).detach()
    return F.linear(x_quant, w_quant)


def test_forward_and_gradients_match_the_reference_code():
    torch.manual_seed(0)
    ours = BitLinear(96, 32)
    theirs = BitLinear(96, 32)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 96) * 3
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_theirs = ours(x_ours), reference_forward(theirs, x_theirs)
    # qlab stores gamma in fp16 (the 'ternary' spec): outputs agree to its rounding, ~5e-4 relative
    assert torch.allclose(y_ours, y_theirs, rtol=2e-3, atol=2e-3 * y_theirs.abs().max().item())
    R = torch.randn_like(y_ours)
    (R * y_ours).sum().backward()
    (R * y_theirs).sum().backward()
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, rtol=2e-3, atol=1e-4)
    assert torch.allclose(ours.norm.weight.grad, theirs.norm.weight.grad, rtol=2e-3, atol=1e-4)
    assert torch.allclose(x_ours.grad, x_theirs.grad, rtol=2e-3, atol=1e-4)


def test_ternary_codes_match_the_reference_and_the_kernel_runs_them():
    torch.manual_seed(1)
    layer = BitLinear(64, 16)
    qt = layer.quantized_weight()
    gamma = layer.weight.detach().abs().mean()
    assert torch.equal(qt.values(), (layer.weight.detach() / gamma).round().clamp(-1, 1))
    x = torch.randn(4, 64)
    W_q = qt.dequantize()
    y = ternary_matmul(x, TernaryWeight.from_quantized(qt), backend="interpret")  # the Triton kernel, interpreted
    assert torch.allclose(y, x @ W_q.T, atol=1e-5)


def _task(seed=0, n=256, dim=32, classes=4):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dim, generator=g)
    y = (X @ torch.randn(dim, classes, generator=g)).argmax(1)  # a fixed random linear labelling
    return X, y


def _mlp(bit: bool, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 4))
    return bitnet_model(model, skip=()) if bit else model


@pytest.mark.parametrize("bit", [False, True])
def test_a_tiny_mlp_learns_in_float_and_in_b158(bit):
    X, y = _task()
    losses = []
    for _ in range(2):  # twice: the run is deterministic
        model = _mlp(bit)
        assert sum(isinstance(m, BitLinear) for m in model.modules()) == (2 if bit else 0)
        log = train(model, lambda m, step: F.cross_entropy(m(X[step % 4 * 64:][:64]), y[step % 4 * 64:][:64]),
                    {"task": "mlp", "bit": bit}, steps=50, lr=3e-3, progress=False)
        losses.append(log.losses)
    assert losses[0] == losses[1]
    first, last = np.mean(losses[0][:4]), np.mean(losses[0][-4:])
    assert last < 0.6 * first, (first, last)
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == y).float().mean().item()
    print(f"bit={bit}: loss {first:.3f} -> {last:.3f}, accuracy {accuracy:.2f}")
    assert accuracy > 0.6  # chance is 0.25


def test_bitnet_model_keeps_the_head_in_float():
    from embedded import tiny_llama

    model = bitnet_model(tiny_llama(tied=False))
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, BitLinear)
    assert model(torch.randint(0, 256, (1, 8))).logits.isfinite().all()


# ---- packing ------------------------------------------------------------------------------------------
def test_pack_trits_hand_example():
    # [1, 0, -1, 1, 1] -> digits [2, 1, 0, 2, 2] -> 2 + 1*3 + 0*9 + 2*27 + 2*81 = 221; [-1] + padding -> 0+3+9+27+81
    assert pack_trits(torch.tensor([1, 0, -1, 1, 1, -1])).tolist() == [221, 120]
    assert pack_trits(torch.tensor([1, 1, 1, 1, 1])).tolist() == [242]  # 3^5 - 1, the largest byte


def test_pack_trits_against_numpy_base_3_digits():
    T = torch.randint(-1, 2, (1000,), generator=torch.Generator().manual_seed(0))
    packed = pack_trits(T)
    for k, byte in enumerate(packed.tolist()):
        digits = np.base_repr(byte, 3).zfill(5)[::-1]  # least significant first
        assert [int(d) - 1 for d in digits] == T[5 * k:5 * k + 5].tolist()


@pytest.mark.parametrize("n", [1, 4, 5, 6, 999, 1000])
def test_trits_round_trip_and_cost_against_two_bit_packing(n):
    W = torch.randn(n)
    qt = quantize(W, "ternary")
    T = qt.values().to(torch.int64)
    packed5, packed2 = pack_trits(T), pack(T + 1, bits=2)  # five per byte vs qlab's 2-bit codes (code = t + 1)
    assert torch.equal(unpack_trits(packed5, n), T)
    assert torch.equal(unpack(packed2, 2, n) - 1, T)
    assert torch.equal(unpack(qt.packed, 2, n) - 1, T)  # qlab's ternary tensor is exactly that 2-bit layout
    assert packed5.numel() == -(-n // 5) and packed2.numel() == -(-n // 4)
    if n == 1000:
        assert 8 * packed5.numel() / n == 1.6 and 8 * packed2.numel() / n == 2.0


def test_trit_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="ternary values"):
        pack_trits(torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="below 243"):
        unpack_trits(torch.tensor([250], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="exactly"):
        unpack_trits(torch.tensor([1, 2], dtype=torch.uint8), 5)

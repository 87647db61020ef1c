"""RTN through the registry, with and without the randomized Hadamard rotation."""
import copy

import pytest
import torch
from torch import nn

import embedded as emb
from qlab.core.rotations import RandomizedHadamard
from qlab.core.tensor import QuantizedTensor, RotatedTensor
from qlab.methods import METHODS
from qlab.methods.weight.rtn import rtn, rtn_method
from qlab.models.walker import quantize_model

SPEC = "int3-g128-asym-minmax"


def test_without_rotation_it_is_the_core_quantize(real_layer):
    W, _ = real_layer
    qt = rtn_method([W], None, SPEC).qweights[0]
    assert isinstance(qt, QuantizedTensor) and torch.equal(qt.dequantize(), rtn(W, SPEC).dequantize())


def test_rotated_rtn_is_rtn_of_the_rotated_weight_turned_back(real_layer):
    W, _ = real_layer  # 192 x 576: 192 = 12 * 16, 576 = 36 * 16
    qt = METHODS["rtn"]([W], None, SPEC, rotate=True, seed=5).qweights[0]
    R = RandomizedHadamard(192, 576, seed=5)
    inner = rtn(R.weight(W.double()).float(), SPEC)
    assert isinstance(qt, RotatedTensor) and torch.equal(qt.inner.codes(), inner.codes())
    assert torch.equal(qt.dequantize(), R.weight_inverse(inner.dequantize().double()).float())
    assert not torch.equal(qt.dequantize(), rtn(W, SPEC).dequantize())


def test_bits_per_weight_by_hand_include_the_signs(real_layer):
    W, _ = real_layer
    qt = rtn_method([W], None, SPEC, rotate=True).qweights[0]
    # 110,592 3-bit codes = 41,472 bytes; 192 rows x 5 groups (4 of 128, one of 64) = 960 fp16 scales = 1,920
    # bytes and 960 3-bit zero points = 360 bytes; the signs: 576 + 192 bits = 96 bytes
    assert qt.inner.nbytes == 41_472 + 1_920 + 360
    assert qt.nbytes == 41_472 + 1_920 + 360 + 96
    assert qt.bits_per_weight == pytest.approx(8 * 43_848 / 110_592, abs=1e-12)  # 3.1719


def test_a_weight_whose_rotation_is_on_the_grid_comes_back_to_round_off():
    g = torch.Generator().manual_seed(0)
    G = torch.randint(0, 16, (24, 32), generator=g).double()
    G[:, [0, 16]], G[:, [1, 17]] = 0, 15  # every group of 16 spans 0..15: int4 asym min-max has scale 1, zero point 0
    R = RandomizedHadamard(24, 32, seed=1)
    W = R.weight_inverse(G)  # float64: its rotation is exactly the integer grid G
    qt = rtn_method([W], None, "int4-g16-asym-minmax", rotate=True, seed=1).qweights[0]
    assert torch.equal(qt.inner.dequantize(), G)
    assert qt.dtype == torch.float64 and (qt.dequantize() - W).abs().max() < 1e-13


def test_one_seed_gives_a_group_one_input_rotation():
    g = torch.Generator().manual_seed(0)
    Wq, Wk = torch.randn(64, 64, generator=g), torch.randn(32, 64, generator=g)
    q, k = rtn_method([Wq, Wk], None, "int4-g32-asym-minmax", rotate=True, seed=3).qweights
    assert torch.equal(q.SU, k.SU) and torch.equal(q.SU, RandomizedHadamard(64, 64, seed=3).SU)
    other = rtn_method([Wq], None, "int4-g32-asym-minmax", rotate=True, seed=4).qweights[0]
    assert not torch.equal(q.SU, other.SU)


def test_a_width_with_no_hadamard_is_refused():
    with pytest.raises(ValueError, match="no Hadamard construction for n = 100"):
        rtn_method([torch.randn(64, 100)], None, SPEC, rotate=True)


@torch.no_grad()
def test_the_walker_applies_a_rotated_rtn_recipe():
    tiny = emb.tiny_llama(vocab=256, hidden=64, layers=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    recipe = {"model.layers.*": {"method": "rtn", "spec": "int4-g32-asym-minmax", "rotate": True}}
    fake, report = quantize_model(tiny, recipe)
    packed, _ = quantize_model(tiny, recipe, mode="packed")
    assert len(report.qtensors) == 14 and all(isinstance(q, RotatedTensor) for q in report.qtensors.values())
    # the same model with each Linear's weight replaced by hand by its de-quantized rotated tensor
    by_hand = copy.deepcopy(tiny)
    for name, qt in report.qtensors.items():
        by_hand.get_submodule(name).weight = nn.Parameter(qt.dequantize(), requires_grad=False)
    y = fake(ids).logits
    assert torch.equal(y, by_hand(ids).logits) and torch.equal(y, packed(ids).logits)
    plain, plain_report = quantize_model(tiny, {"model.layers.*": "int4-g32-asym-minmax"})
    assert not torch.equal(y, plain(ids).logits)
    # the sizes: the plain tensors' bytes plus the signs, (64 + 64) / 8 bytes for q and o, (64 + 32) / 8 for k and
    # v, (64 + 128) / 8 for gate, up and down, per layer
    signs = 2 * (2 * 16 + 2 * 12 + 3 * 24)
    assert report.quantized.bytes.sum() == plain_report.quantized.bytes.sum() + signs

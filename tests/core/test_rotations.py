import math

import pytest
import torch

from qlab.core.rotations import (RandomizedHadamard, hadamard, hadamard_factors, hadamard_transform,
                                 hessian_incoherence, paley_kind, weight_incoherence)
from qlab.kernels.hadamard import hadamard_matrix as sylvester_reference, hadamard_transform_reference

from embedded import embedded  # noqa: F401  (session fixture)

SIZES = [1, 2, 4, 8, 12, 20, 28, 36, 44, 60, 76, 192, 576, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_rows_are_orthogonal_exactly(n):
    H = hadamard(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))  # integer arithmetic: exact


def test_the_embedded_model_widths_factor_as_the_issue_says():
    assert hadamard_factors(576) == (36, 16)
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(192) == (12, 16)
    assert paley_kind(12) == "paley1" and paley_kind(20) == "paley1" and paley_kind(36) == "paley2"


def test_paley_i_of_order_4_by_hand():
    # q = 3: chi(1) = 1, chi(2) = -1, Q = [[0, 1, -1], [-1, 0, 1], [1, -1, 0]]; H = I + [[0, 1^T], [-1, Q]]
    from qlab.core.rotations import _paley1
    expected = torch.tensor([[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]], dtype=torch.float64)
    assert torch.equal(_paley1(3), expected)


@pytest.mark.parametrize("n", [1, 2, 16, 128])
def test_power_of_two_is_the_kernels_sylvester_matrix(n):
    assert torch.equal(hadamard(n).float(), sylvester_reference(n))


@pytest.mark.parametrize("n", [3, 6, 10, 63, 100])
def test_sizes_without_construction_are_refused(n):
    with pytest.raises(ValueError, match=rf"no Hadamard construction for n = {n}: supported sizes are 2\^k"):
        hadamard(n)
    with pytest.raises(ValueError, match=f"n = {n}"):
        RandomizedHadamard(m=12, n=n)


@pytest.mark.parametrize("n", [12, 36, 192, 576, 1536])
def test_fast_transform_equals_the_dense_product(n):
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    V = hadamard(n) / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x), x @ V.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, transpose=True), x @ V, rtol=0, atol=1e-12)


def test_power_of_two_transform_matches_the_fwht_kernel_reference():
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform_reference(x), rtol=1e-5, atol=1e-5)


def _dense(R):
    Vm, Vn = hadamard(R.m) / math.sqrt(R.m), hadamard(R.n) / math.sqrt(R.n)
    return Vm @ torch.diag(R.SV), torch.diag(R.SU) @ Vn.T  # left and right factors: W' = L W Rt


def test_two_sided_transform_is_the_quip_sharp_formula_and_exact_when_nothing_is_quantized():
    g = torch.Generator().manual_seed(1)
    m, n = 192, 576
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    X = torch.randn(40, n, dtype=torch.float64, generator=g)
    R = RandomizedHadamard(m, n, seed=3)
    L, Rt = _dense(R)
    Wr = R.weight(W)
    torch.testing.assert_close(Wr, L @ W @ Rt, rtol=0, atol=1e-12)  # V_m S_V W S_U V_n^T
    torch.testing.assert_close(R.weight_inverse(Wr), W, rtol=0, atol=1e-12)
    # the layer y = x W^T computed in the rotated basis and turned back
    torch.testing.assert_close(R.output(R.input(X) @ Wr.T), X @ W.T, rtol=0, atol=1e-11)
    # H' = V_n S_U H S_U V_n^T is the Gram matrix of the rotated inputs
    H = X.T @ X
    torch.testing.assert_close(R.hessian(H), R.input(X).T @ R.input(X), rtol=0, atol=1e-10)
    torch.testing.assert_close(R.hessian(H), Rt.T @ H @ Rt, rtol=0, atol=1e-10)


def test_signs_are_seeded_and_shapes_are_checked():
    a, b, c = RandomizedHadamard(12, 16, seed=0), RandomizedHadamard(12, 16, seed=0), RandomizedHadamard(12, 16, 1)
    assert torch.equal(a.SU, b.SU) and not torch.equal(a.SU, c.SU)
    with pytest.raises(ValueError, match=r"W must have shape \(12, 16\)"):
        a.weight(torch.zeros(16, 12))


def test_a_transform_from_stored_signs_uses_those_signs():
    a = RandomizedHadamard(12, 16, seed=0)
    SU, SV = -a.SU, a.SV.float()
    b = RandomizedHadamard.from_signs(SU, SV, seed=0)
    assert torch.equal(b.SU, SU.double()) and torch.equal(b.SV, a.SV) and (b.m, b.n) == (12, 16)
    W = torch.randn(12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.weight(W), -a.weight(W), rtol=0, atol=1e-13)  # S_U -> -S_U negates W'
    with pytest.raises(ValueError, match="SU must be 16 signs"):
        RandomizedHadamard.from_signs(SU * 0, SV)
    with pytest.raises(ValueError, match="no Hadamard construction for n = 14"):
        RandomizedHadamard.from_signs(torch.ones(14), SV)


def test_incoherence_by_hand():
    assert weight_incoherence(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(2.0)  # sqrt(mn)
    assert weight_incoherence(torch.ones(3, 5)) == pytest.approx(1.0)
    assert hessian_incoherence(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.sqrt(2))
    H4 = hadamard(4)
    spread = H4 @ torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)) @ H4.T
    assert hessian_incoherence(spread) == pytest.approx(1.0)  # eigenvectors = Hadamard columns / 2


def test_rotation_spreads_a_planted_outlier():
    g = torch.Generator().manual_seed(0)
    m, n = 96, 192
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    W[5, 7] = 200.0  # one huge weight
    X = torch.randn(400, n, dtype=torch.float64, generator=g)
    X[:, 11] *= 30.0  # one loud input channel: H has an eigenvector on coordinate 11
    H = X.T @ X
    R = RandomizedHadamard(m, n, seed=0)
    mu_W, mu_W_rot = weight_incoherence(W), weight_incoherence(R.weight(W))
    mu_H, mu_H_rot = hessian_incoherence(H), hessian_incoherence(R.hessian(H))
    assert mu_W > 40 and mu_W_rot < 6  # a Gaussian m x n matrix has mu ~ sqrt(2 ln(mn)) = 4.9
    assert mu_H > 0.99 * math.sqrt(n) and mu_H_rot < 6


@pytest.mark.model
def test_rotation_on_the_embedded_model(embedded):
    """SmolLM2-135M layer 15: mu_W and mu_H fall to about a Gaussian's, and the rotated layer is exact in float64."""
    from embedded import windows

    model, _ = embedded
    layer = model.model.layers[15]
    inputs = {}
    hook = layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0]))
    with torch.no_grad():
        model.model(windows(512, 2), use_cache=False)  # 1024 tokens > 576: H has full rank
    hook.remove()
    X = inputs["x"].reshape(-1, 576).double()
    H = X.T @ X
    H = H / H.diag().mean() + 0.01 * torch.eye(576, dtype=torch.float64)  # QuIP#'s regularisation
    W = layer.self_attn.q_proj.weight.detach().double()
    R = RandomizedHadamard(576, 576, seed=0)
    assert hessian_incoherence(H) > 15 and hessian_incoherence(R.hessian(H)) < 6  # sqrt(576) = 24
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        W = layer.get_submodule(name).weight.detach().double()
        R = RandomizedHadamard(*W.shape, seed=0)
        assert weight_incoherence(W) > 10 and weight_incoherence(R.weight(W)) < 6, name
    W = layer.self_attn.q_proj.weight.detach().double()
    R = RandomizedHadamard(576, 576, seed=0)
    torch.testing.assert_close(R.output(R.input(X) @ R.weight(W).T), X @ W.T, rtol=0, atol=1e-10)

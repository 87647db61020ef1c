import math

import pytest
import torch

from qlab.kernels.hadamard import hadamard_matrix, hadamard_transform, hadamard_transform_reference, random_signs


def test_sylvester_matrix_is_orthogonal_with_entries_pm1():
    H = hadamard_matrix(16)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, 16 * torch.eye(16))
    i = torch.arange(16)
    popcount = sum(((i[:, None] & i[None, :]) >> b) & 1 for b in range(4))
    assert torch.equal(H, (-1.0) ** popcount)  # H[i, j] = (-1)^popcount(i & j)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
@pytest.mark.parametrize("use_signs", [False, True])
def test_kernel_and_reference_match_explicit_matrix(seeded, backend, n, use_signs):
    x = torch.randn(5, n, generator=seeded(n))
    signs = random_signs(n, seed=1) if use_signs else None
    expected = ((x * signs) if use_signs else x) @ hadamard_matrix(n).T / math.sqrt(n)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hadamard_transform_reference(x, signs), expected, **tol)
    torch.testing.assert_close(hadamard_transform(x, signs, backend=backend), expected, **tol)


def test_integer_inputs_are_exact_unnormalized(seeded, backend):
    x = torch.randint(-50, 50, (2, 3, 32), generator=seeded(2)).float()  # leading dims kept
    y = hadamard_transform(x, normalize=False, backend=backend)
    assert y.shape == x.shape and torch.equal(y, x @ hadamard_matrix(32).T)
    hand = hadamard_transform(torch.tensor([3.0, 1.0]), backend=backend)  # [3 + 1, 3 - 1] / sqrt(2)
    assert hand.tolist() == pytest.approx([2.828427, 1.414214])


def test_bad_sizes():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_transform(torch.randn(2, 12))
    with pytest.raises(ValueError, match="signs"):
        hadamard_transform(torch.randn(2, 8), signs=torch.ones(4))

"""qlab.study.outliers on hand-made activations (no model needed)."""
import pytest
import torch

from qlab.study.outliers import activation_error_table, position_profile


def test_activation_error_table_sink_token_and_outlier_channel():
    # 4 tokens x 3 channels; token 0 is a sink (1000 in channel 0); the others are ordinary values below 1
    X = torch.tensor([[1000.0, 0.0, 0.0], [0.5, 0.25, -0.5], [0.3, -0.2, 0.1], [-0.4, 0.1, 0.2]])
    first = torch.tensor([True, False, False, False])
    table = activation_error_table(X, first, specs=("int8-tensor-sym-absmax",))["int8-tensor-sym-absmax"]
    assert table["plain"] == 1.0  # step 1000/127 ≈ 7.9: every ordinary value rounds to 0
    assert table["first token in float"] < 0.01  # their own scale 0.5/127
    # channel 0 holds the sink's 1000 (> 6): keeping it in float leaves channels 1-2 (max 0.5) on their own scale
    assert table["1 channels > 6 in float"] == pytest.approx(
        float((X[1:, 1:] - torch.round(X[1:, 1:] / (0.5 / 127)) * (0.5 / 127)).norm() / X[1:].norm()), abs=2e-3)
    with pytest.raises(ValueError, match="boolean mask"):
        activation_error_table(X, torch.tensor([1, 0, 0, 0]))


def test_position_profile():
    # 2 windows, 2 blocks, 4 positions
    res = torch.tensor([[[900.0, 1, 2, 3], [5.0, 6, 7, 8]],
                        [[800.0, 4, 5, 6], [9.0, 1, 1, 1]]])
    p = position_profile(res, q=0.5)
    assert p["first"].tolist() == [900.0, 9.0]
    assert p["ordinary_max"].tolist() == [6.0, 8.0]
    assert p["ordinary_quantile"].tolist() == [3.5, 3.5]  # medians of (1,2,3,4,5,6) and (6,7,8,1,1,1)

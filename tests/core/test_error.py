import math

import torch

from qlab.core.error import max_abs, mse, rel_fro, sqnr_db


def test_metrics_by_hand():
    x = torch.tensor([3.0, 4.0])
    x_hat = torch.tensor([3.0, 3.0])
    assert mse(x, x_hat) == 0.5
    assert rel_fro(x, x_hat) == 1 / 5
    assert max_abs(x, x_hat) == 1.0
    assert math.isclose(sqnr_db(x, x_hat), 10 * math.log10(25 / 1))
    assert sqnr_db(x, x) == math.inf

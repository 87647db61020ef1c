"""Golden outputs: the numbers qlab computed before the core redesign, recomputed now (see golden_cases)."""
import math
from pathlib import Path

import pytest
import torch

from golden_cases import compute_all

GOLDEN = Path(__file__).parent / "data" / "golden" / "golden.pt"


@pytest.fixture(scope="module")
def now():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute_all()
    finally:
        torch.set_num_threads(before)


def test_every_recorded_output_is_unchanged(now):
    golden = torch.load(GOLDEN, weights_only=False)
    assert set(now) == set(golden), sorted(set(now) ^ set(golden))[:5]
    changed = []
    for key, want in golden.items():
        got = now[key]
        if isinstance(want, torch.Tensor):
            same = isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
        elif isinstance(want, float):
            same = got == want or (math.isnan(got) and math.isnan(want))
        else:
            same = got == want
        if not same:
            changed.append(key)
    assert not changed, f"{len(changed)} golden outputs changed, e.g. {changed[:8]}"

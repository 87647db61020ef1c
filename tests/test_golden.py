"""Golden outputs: the numbers qlab computed before the core redesign, recomputed now (see golden_cases).

Whole-model entries depend on the CPU's BLAS kernels: ``platform-*.pt`` hold their digests on other machines
(tests/data/golden/record.py says how they are recorded); one of them may stand in for golden.pt's."""
from pathlib import Path

import pytest
import torch

from golden_cases import compute_all, same

GOLDEN = Path(__file__).parent / "data" / "golden" / "golden.pt"
PLATFORMS = sorted(GOLDEN.parent.glob("platform-*.pt"))


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
    changed = [key for key, want in golden.items() if not same(now[key], want)]
    if not changed:
        return
    for path in PLATFORMS:  # golden.pt with another machine's whole-model digests in place of its own
        other = torch.load(path, weights_only=False)
        machine = other.pop("__machine__")
        if set(changed) <= set(other) and all(same(now[k], v) for k, v in other.items()):
            print(f"golden outputs equal, with the whole-model digests of {path.name} ({machine})")
            return
    assert not changed, (f"{len(changed)} golden outputs changed, e.g. {changed[:8]} (none of the platform files "
                         f"{[p.name for p in PLATFORMS]} accounts for them)")

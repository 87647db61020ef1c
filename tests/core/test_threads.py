"""run_split: every index of the range handed out exactly once, in torch's thread count of pieces."""
import threading

import pytest
import torch

from qlab.core.threads import pieces, run_split


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_pieces_follow_torch_threads_and_the_grain(two_threads):
    assert pieces(1000, 100) == 2
    assert pieces(150, 100) == 1  # two pieces would hold fewer than 100 items each
    assert pieces(0, 100) == 1 and pieces(10, 0) == 2
    torch.set_num_threads(1)
    assert pieces(10**6, 1) == 1


def test_every_index_once_on_two_threads(two_threads):
    seen, names = [], set()

    def work(start, stop):
        names.add(threading.current_thread().name)
        seen.append((start, stop))

    run_split(work, 1001, 10)
    assert sorted(seen) == [(0, 500), (500, 1001)]
    assert len(names) == 2 and threading.current_thread().name in names  # the caller does one piece


def test_an_error_in_a_piece_is_raised(two_threads):
    def work(start, stop):
        if start > 0:
            raise ValueError(f"piece {start}:{stop}")

    with pytest.raises(ValueError, match="piece 50:100"):
        run_split(work, 100, 1)

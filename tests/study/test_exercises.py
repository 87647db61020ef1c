"""qlab.study.exercises: the check that every notebook's exercises use."""
import pytest

from qlab.study.exercises import check, close


def test_close_numbers_lists_and_strings():
    assert close(0.1 + 0.2, 0.3, rel=1e-12)
    assert not close(0.31, 0.3, rel=1e-2)
    assert close(0.31, 0.3, abs=0.011)
    assert close([1, 2.0000001], (1, 2), rel=1e-6)
    assert not close([1, 2], [1, 2, 3])
    assert close("fp16", "fp16") and not close("bf16", "fp16")
    assert not close("abc", 1.0)


def test_check_answer_right_and_wrong(capsys):
    assert check("answer_1", 12, lambda: 12, 12) == 12
    assert "answer_1 = 12: correct" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="answer_1 = 13 is not 12"):
        check("answer_1", 13, lambda: 12, 12)


def test_check_none_runs_the_solution(capsys):
    assert check("answer_2", None, lambda: 2 ** -10, 9.765625e-4) == 2 ** -10
    assert "answer_2 is None: checked the reference solution" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="reference solution gives 3"):
        check("answer_2", None, lambda: 3, 4)  # a wrong reference solution fails CI
    with pytest.raises(TypeError, match="solution must be a function"):
        check("answer_2", None, 3, 3)

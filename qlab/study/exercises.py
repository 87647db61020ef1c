"""Notebook exercises: the student writes an answer into a variable; one call checks it.

The pattern every notebook uses (explained once in notebook 01):

* a code cell ``answer_1 = None`` that the student fills in;
* a check cell ``check("answer_1", answer_1, solution_1, expected)``: ``expected`` is computed a second,
  independent way (a closed form or the notebook's own outputs), ``solution_1`` is the reference solution.
  While the answer is ``None`` the check runs the reference solution instead and says so, so a papermill
  run (CI, ``make run``) checks the solution and a student who has not answered yet is not stopped.

>>> check("answer_1", None, lambda: 0.1 + 0.2, 0.3, rel=1e-9)
answer_1 is None: checked the reference solution instead (0.3); write yours into answer_1 and rerun
0.30000000000000004
"""
import math


def close(answer, expected, rel: float = 1e-6, abs: float = 0.0) -> bool:
    """``answer`` equals ``expected`` within ``max(rel * |expected|, abs)``; element-wise for lists and
    tuples (same length), exact for strings and booleans."""
    if isinstance(expected, (list, tuple)):
        return (isinstance(answer, (list, tuple)) and len(answer) == len(expected)
                and all(close(a, e, rel, abs) for a, e in zip(answer, expected)))
    if isinstance(expected, (str, bool)) or expected is None:
        return answer == expected
    try:
        answer, expected = float(answer), float(expected)
    except (TypeError, ValueError):
        return False
    return math.isclose(answer, expected, rel_tol=rel, abs_tol=abs)


def check(name: str, answer, solution, expected, rel: float = 1e-6, abs: float = 0.0):
    """Assert that ``answer`` (or, while it is None, ``solution()``) matches ``expected``; return what was checked."""
    if not callable(solution):
        raise TypeError(f"solution must be a function returning the reference answer, got {type(solution).__name__}")
    if answer is None:
        answer = solution()
        assert close(answer, expected, rel, abs), f"the reference solution gives {answer!r}, expected {expected!r}"
        print(f"{name} is None: checked the reference solution instead ({_short(expected)}); "
              f"write yours into {name} and rerun")
        return answer
    assert close(answer, expected, rel, abs), (
        f"{name} = {answer!r} is not {_short(expected)} (tolerance: relative {rel}, absolute {abs}); "
        f"see the solution above")
    print(f"{name} = {_short(answer)}: correct")
    return answer


def _short(v):
    return f"{v:.6g}" if isinstance(v, float) else repr(v)

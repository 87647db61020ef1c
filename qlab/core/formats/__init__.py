"""Number grids: the finite sets of values that a low-bit code can stand for.

Every grid answers the same four questions, so every quantizer in qlab can use any of them:

* ``round(x)``   -> the nearest representable value (x already divided by the scale);
* ``encode(v)``  -> the integer code (0 .. 2**bits - 1) of a representable value;
* ``decode(c)``  -> the value of a code;
* ``max_abs``    -> the largest magnitude, which absmax scaling maps the tensor's max onto.

>>> get_grid("int4").round(torch.tensor([2.6, -9.0]))
tensor([ 3., -8.])

Vector grids round a group of weights at once: the lattices Z^n, D_n, E8 and A_n and QuIP#'s E8P codebook
(2^16 points of E8 + 1/4, 16 bits per 8 weights) live in ``lattice``.
"""
from qlab.core.formats.integer import IntGrid
from qlab.core.formats.floating import FloatGrid
from qlab.core.formats.table import TableGrid, dynamic8_levels, nf4_levels
from qlab.core.formats.lattice import (e8p_abs_patterns, e8p_codebook, e8p_decode, e8p_encode, e8p_nearest,
                                       nearest_an, nearest_dn, nearest_e8, nearest_zn, normalized_second_moment)

import torch  # noqa: F401  (used by the doctest above)


def _build_registry() -> dict:
    grids = {}
    for bits in range(1, 9):
        grids[f"int{bits}"] = IntGrid(bits, signed=True)
        grids[f"uint{bits}"] = IntGrid(bits, signed=False)
    for grid in (
        FloatGrid("fp8_e4m3", exp_bits=4, man_bits=3, bias=7, max=448.0),
        FloatGrid("fp8_e5m2", exp_bits=5, man_bits=2, bias=15, max=57344.0),
        FloatGrid("fp4_e2m1", exp_bits=2, man_bits=1, bias=1, max=6.0),
        FloatGrid("fp16", exp_bits=5, man_bits=10, bias=15, max=65504.0),
        FloatGrid("bf16", exp_bits=8, man_bits=7, bias=127, max=3.3895313892515355e38),
        TableGrid("nf4", nf4_levels()),
        TableGrid("ternary", (-1.0, 0.0, 1.0)),
        TableGrid("binary", (-1.0, 1.0)),
        TableGrid("dynamic8", dynamic8_levels()),
    ):
        grids[grid.name] = grid
    return grids


GRIDS = _build_registry()


def get_grid(name: str, restricted: bool = False):
    """Look a grid up by name ('int4', 'uint8', 'fp8_e4m3', 'nf4', ...).

    ``restricted=True`` gives the symmetric signed range, e.g. int8 -> [-127, 127] instead of [-128, 127].
    """
    if name not in GRIDS:
        raise ValueError(f"unknown number format {name!r}; known: {', '.join(GRIDS)}")
    grid = GRIDS[name]
    if restricted:
        if not (isinstance(grid, IntGrid) and grid.signed):
            raise ValueError(f"the restricted range applies to signed integer grids, not {name!r}")
        grid = IntGrid(grid.bits, signed=True, restricted=True)
    return grid


__all__ = ["IntGrid", "FloatGrid", "TableGrid", "GRIDS", "get_grid", "nf4_levels", "dynamic8_levels",
           "nearest_zn", "nearest_dn", "nearest_e8", "nearest_an", "normalized_second_moment",
           "e8p_abs_patterns", "e8p_codebook", "e8p_decode", "e8p_encode", "e8p_nearest"]

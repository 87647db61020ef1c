"""What every method returns, and how a method is described in the registry.

A method quantizes a *group* of Linear weights that read the same input (q/k/v, gate/up, or one Linear):

    result = method(weights, X, spec, names=None, **options)

* ``weights``: float weights [out_i, in], as the model holds them now;
* ``X``: their calibration inputs, a list of batches [..., in] (None when the method needs none);
* ``spec``: the format (a QuantSpec or its string; a GGUF type such as 'Q4_K' for the gguf method);
* ``names``: the Linears' qualified names (AWQ skips clipping q and k, as its reference does).

It returns a :class:`QuantResult`: one quantized tensor per weight (any QTensor), and optionally
per-input-channel scales ``fold`` to fold into the op that produces the input, and how the inputs
are quantized at run time (``act``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class QuantResult:
    """qweights: one QTensor per weight, in order.
    fold:     scales s [in] (or None): the previous op's output must be divided by s; the qweights already
              hold W diag(s) (SmoothQuant eq. 4, AWQ eq. 4-5). The model walker folds them.
    weights:  the float weights the method actually quantized, when it changed them (W diag(s), clipped),
              for a later fold that has to rescale them (AWQ's up_proj before down_proj).
    act:      run-time activation quantization: None (weight-only), {'kind': 'w8a8', 'act': 'token' |
              'tensor' | 'static', 'static_scale': float | None} or {'kind': 'llm_int8', 'threshold': t}.
    info:     anything worth keeping about the search (AWQ's alpha and losses, ...).
    """

    qweights: list
    fold: torch.Tensor | None = None
    weights: list | None = None
    act: dict | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registry entry.

    name:         the key in ``qlab.methods.METHODS`` and in recipes ('gptq:int4-g128-asym-minmax')
    fn:           the function with the signature above
    needs_inputs: whether it needs calibration inputs; a callable of the options when that depends on them
    folds_into:   the kinds of previous op its ``fold`` may go into ('norm', 'linear'); where the walker finds
                  no such op (o_proj under grouped-query attention), it applies ``fallback`` instead
    sequential:   True: layer l is calibrated on the outputs of the already-quantized layers 0..l-1 (GPTQ's
                  reference; a second pass through each layer once quantized); False: on the float model's,
                  from the calibration pass itself (AWQ's reference, llm-awq's run_awq; SmoothQuant's statistics)
    parse_spec:   the method's own spec parser (a GGUF type, QuIP#'s 'e8p'); None: a QuantSpec string
    revision:     raised by one when a change moves the method's numbers: it enters the sweep key of every
                  configuration using the method (``qlab.eval.sweep``), so rows cached before are computed again
    """

    name: str
    fn: Callable
    needs_inputs: bool | Callable = False
    folds_into: tuple = ()
    fallback: str | None = None
    sequential: bool = True
    parse_spec: Callable | None = None
    revision: int = 1
    doc: str = ""

    def wants_inputs(self, options: dict) -> bool:
        return self.needs_inputs(options) if callable(self.needs_inputs) else bool(self.needs_inputs)

    def __call__(self, weights, X, spec, names=None, **options) -> QuantResult:
        if self.wants_inputs(options) and not X:
            raise ValueError(f"method {self.name!r} needs calibration inputs: pass calibration windows "
                             f"(quantize_model(..., calib=windows)) or choose an uncalibrated method such as 'rtn'")
        return self.fn(list(weights), X, spec, names=names, **options)

"""Post-training quantization algorithms for one layer.

Each takes a weight [out, in] (or an nn.Linear), a spec and calibration statistics, and returns the
core ``QuantizedTensor`` (AWQ and SmoothQuant also return the channel scales to fold into the
previous op, see ``qlab.transforms``):

* ``rtn``          round-to-nearest, no calibration;
* ``gptq``         Hessian-aware column-by-column rounding with error feedback (H = 2/n X^T X);
* ``awq``          activation-aware per-input-channel scaling + clipping search (mean|x| and inputs);
* ``smoothquant``  W8A8 with difficulty migrated from activations to weights (max|x| per channel);
* ``llm_int8``     int8 matmul with outlier input features kept in float.

Import each from its module (``from qlab.algorithms.gptq import gptq``); the package itself only holds
the registry of weight-only methods, all called as ``(W, spec, **statistics) -> QuantizedTensor``.
"""
from qlab.algorithms import awq, gptq, llm_int8, rtn, smoothquant  # noqa: F401  (the modules)

WEIGHT_ALGORITHMS = {
    "rtn": lambda W, spec, **stats: rtn.rtn(W, spec),
    "gptq": lambda W, spec, H, **opts: gptq.gptq(W, H, spec, **opts),
}
# AWQ and SmoothQuant are not in this table: their quantized weights belong to a *rescaled* layer and are only
# correct once their scales are folded into the previous op (see qlab.algorithms.sequential.awq_model).

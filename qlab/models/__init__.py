"""Model plumbing: loading (the embedded default or any transformers causal LM), WikiText-2 windows,
calibration hooks, function-preserving transforms, the quantized modules and the one walker that applies
any registered method to a model's layers.

* ``loading``     load_model, the embedded GGUF, linear_layers, model_summary
* ``data``        WikiText-2 split by article into calibration and evaluation windows
* ``calib``       input statistics and captured inputs of chosen layers; importance matrices
* ``transforms``  per-channel scaling folded into the previous op (SmoothQuant, AWQ)
* ``modules``     QuantLinear, QuantEmbedding, W8A8Linear, Int8Linear
* ``walker``      recipes (name patterns -> method + spec) applied to a model, sequentially when calibrated
"""
from qlab.models.loading import (EMBEDDED, REPO_ROOT, cache_dir, embedded_gguf_path, linear_layers, load_model,
                                 model_summary, weight_stats)

__all__ = ["EMBEDDED", "REPO_ROOT", "cache_dir", "embedded_gguf_path", "linear_layers", "load_model",
           "model_summary", "weight_stats"]

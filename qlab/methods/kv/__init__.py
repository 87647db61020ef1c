"""KV-cache quantization: what is stored for the keys and values a later token attends to.

* ``kivi.py``   KIVI's grouping as a core spec, on the KIVI kernel
* ``cache.py``  a transformers ``Cache`` that stores keys and values quantized (FP8 per token or per
  tensor, KIVI, per-token keys as a baseline) for ``generate`` and chunked forward passes; imports
  transformers, so it is not imported here
* ``gear.py``   GEAR's X_hat = Q(X - S) + S + L: exact outliers, KIVI-grouped codes, a low-rank error term
"""

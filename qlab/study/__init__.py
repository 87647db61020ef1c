"""Study: theory (rate-distortion, Lloyd-Max), floating-point precision, memory budgets, alignment with the
embedded checkpoint's grid, the roofline model, GGUF-vs-core error tables, and every plot.

The top layer of the package: it may import any other layer, and nothing but benchmarks imports it.
"""

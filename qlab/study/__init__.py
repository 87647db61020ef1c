"""Study: theory (rate-distortion, Lloyd-Max), floating-point precision, memory budgets, alignment with the
embedded checkpoint's grid, the roofline model, GGUF-vs-core error tables, the granularity ladder, outlier and
GPTQ column views, paired perplexity intervals between sweep rows, the notebooks' exercise checks, and every plot.

The top layer of the package: it may import any other layer, and nothing but benchmarks imports it.
"""

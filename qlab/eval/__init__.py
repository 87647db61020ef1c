"""Evaluation: perplexity, KL divergence and top-1 agreement against the float model (``metrics``), and
resumable sweeps of configurations x models -> one results table (``sweep``).

``python -m qlab.eval`` prints a model's WikiText-2 perplexity (the README's reference number).
"""
from qlab.eval.metrics import Reference, evaluate, paired_ppl_ratio, perplexity, reference_logprobs

__all__ = ["Reference", "evaluate", "paired_ppl_ratio", "perplexity", "reference_logprobs"]

"""Error metrics between a tensor and its quantized reconstruction.

SQNR (signal-to-quantization-noise ratio) in dB is 10 log10(sum x^2 / sum (x - x_hat)^2); each extra
bit of a uniform quantizer on a full-scale uniform signal adds 20 log10(2) = 6.02 dB.
"""
import torch


def _check(x, x_hat):
    if x.shape != x_hat.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
    return x.double(), x_hat.double()


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = _check(x, x_hat)
    return float(((x - x_hat) ** 2).mean())


def rel_fro(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """||x - x_hat||_F / ||x||_F."""
    x, x_hat = _check(x, x_hat)
    return float(torch.linalg.vector_norm(x - x_hat) / torch.linalg.vector_norm(x))


def max_abs(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = _check(x, x_hat)
    return float((x - x_hat).abs().max())


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = _check(x, x_hat)
    noise = float(((x - x_hat) ** 2).sum())
    return float("inf") if noise == 0 else 10 * torch.log10((x**2).sum() / noise).item()


def report(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """All four metrics in one dict (handy for tables)."""
    return {f.__name__: f(x, x_hat) for f in (mse, rel_fro, max_abs, sqnr_db)}

"""Where a layer's output error comes from, column by column (notebook 06).

The output error of W_hat against W on inputs X [n, d] is ||X Dᵀ||_F² with D = W - W_hat. Written per input
column j it is Σ_j c_j with

    c_j = Σ_r D_rj (D A)_rj,        A = XᵀX,

and c_j = Σ_r D_rj² A_jj + Σ_r D_rj Σ_(k≠j) A_jk D_rk: a *diagonal* term (what column j would cost alone) plus
*cross* terms with the other columns. RTN's errors are independent of X, so its cross terms roughly cancel
out on average; GPTQ chooses its errors so that the cross terms are negative (each column's error is partly
cancelled by the compensation put on correlated columns). A plot of the diagonal terms alone therefore cannot
show GPTQ's gain; the full shares c_j can.
"""
import torch


def column_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> dict:
    """Per input column j, relative to ||X Wᵀ||_F²: 'full' c_j (with the cross terms; sums to the relative
    output error ||X(W - W_hat)ᵀ||² / ||X Wᵀ||²) and 'diagonal' (its A_jj term alone)."""
    if W.shape != W_hat.shape or W.shape[1] != X.shape[1]:
        raise ValueError(f"need W and W_hat of one shape [out, d] and X [n, d]; got W {tuple(W.shape)}, "
                         f"W_hat {tuple(W_hat.shape)}, X {tuple(X.shape)}")
    X, D = X.double(), (W - W_hat).double()
    A = X.T @ X
    norm = float(((X @ W.double().T) ** 2).sum())
    full = (D * (D @ A)).sum(0) / norm
    diagonal = (D**2).sum(0) * torch.diag(A) / norm
    return {"full": full, "diagonal": diagonal}


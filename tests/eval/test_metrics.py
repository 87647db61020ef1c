"""Perplexity, KL divergence and top-1 agreement: hand examples, transformers' own loss, and RTN."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import embedded as emb
from embedded import embedded  # noqa: F401
from qlab.models.walker import quantize_model, weight_only
from qlab.eval import evaluate, paired_ppl_ratio, perplexity, reference_logprobs


class FixedLM(torch.nn.Module):
    """Returns the same logits row (a fixed next-token distribution) at every position."""

    def __init__(self, logits_row):
        super().__init__()
        self.row = torch.nn.Parameter(torch.as_tensor(logits_row, dtype=torch.float32))

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, n, -1))


def test_perplexity_by_hand():
    # uniform over 4 tokens: every token costs log 4, PPL = 4
    assert perplexity(FixedLM([0.0, 0, 0, 0]), torch.tensor([[0, 1, 2, 3]]), progress=False) == pytest.approx(4.0)
    # p = (1/2, 1/4, 1/4): window [0, 1, 0] scores tokens 1 and 0 -> PPL = exp((log 4 + log 2) / 2) = sqrt(8)
    lm = FixedLM(torch.log(torch.tensor([0.5, 0.25, 0.25])))
    assert perplexity(lm, torch.tensor([[0, 1, 0]]), progress=False) == pytest.approx(math.sqrt(8))


def test_kl_and_top1_by_hand():
    windows = torch.tensor([[0, 1, 2], [2, 1, 0]])
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    ref = reference_logprobs(FixedLM(p.log()), windows, dtype=torch.float32, progress=False)
    out = evaluate(FixedLM(q.log()), windows, ref, batch_size=2, progress=False)
    kl = float((p * (p / q).log()).sum())  # 0.5 ln 2.5 + 0.2 ln 0.4 = 0.2749
    assert out["kl_mean"] == pytest.approx(kl, rel=1e-5) and out["kl_median"] == pytest.approx(kl, rel=1e-5)
    assert out["kl_mean"] == pytest.approx(float(F.kl_div(q.log(), p, reduction="sum")), rel=1e-5)
    assert out["top1"] == 0.0  # argmax P = 0, argmax Q = 2
    assert out["n_tokens"] == 4 and out["ppl_ref"] == pytest.approx(ref.perplexity)



class LinearLM(torch.nn.Module):
    """An embedding table and a linear head without bias: logits = E[ids] @ W^T."""

    def __init__(self, vocab, dim, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.E = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight.data = torch.randn(vocab, dim, generator=g)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.head(self.E[input_ids]))


def test_bf16_autocast_runs_the_forward_matmuls_in_bf16():
    lm = LinearLM(32, 16, 0)
    windows = torch.randint(0, 32, (3, 20), generator=torch.Generator().manual_seed(1))

    def ppl_of(logits):
        nll = -F.log_softmax(logits[:, :-1].float(), -1).gather(-1, windows[:, 1:, None])
        return math.exp(float(nll.mean()))

    fp32 = evaluate(lm, windows, progress=False)["ppl"]
    bf16 = evaluate(lm, windows, progress=False, autocast="bf16")["ppl"]
    by_hand = ppl_of(lm.E[windows].bfloat16() @ lm.head.weight.bfloat16().T)  # the product in bf16, rounded to bf16
    assert fp32 == pytest.approx(ppl_of(lm.E[windows] @ lm.head.weight.T), rel=1e-6)
    assert bf16 == pytest.approx(by_hand, rel=1e-6) and bf16 != pytest.approx(fp32, rel=1e-4)
    with pytest.raises(ValueError, match=r"autocast must be one of \[None, 'bf16'\], got 'fp8'"):
        evaluate(lm, windows, progress=False, autocast="fp8")


class RandomLM(torch.nn.Module):
    """Seeded random logits for every position (a different distribution at each one)."""

    def __init__(self, vocab, length, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(3 * torch.randn(length, vocab, generator=g))

    def forward(self, input_ids, use_cache=False):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.table[:n].expand(b, n, -1))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_chunked_scoring_equals_the_whole_window_formulas(batch_size):
    # windows longer than metrics.CHUNK positions: the chunk-by-chunk scoring gives the whole-tensor formulas'
    # numbers bit for bit (log-softmax, NLL, KL and argmax are all per position)
    from qlab.eval import metrics

    vocab, length = 50, 3 * metrics.CHUNK + 7
    windows = torch.randint(0, vocab, (3, length), generator=torch.Generator().manual_seed(1))
    p_lm, q_lm = RandomLM(vocab, length, 2), RandomLM(vocab, length, 3)
    ref = reference_logprobs(p_lm, windows, batch_size, progress=False)
    out = evaluate(q_lm, windows, ref, batch_size, progress=False)

    lp = F.log_softmax(p_lm.table[: length - 1].detach(), -1).expand(3, -1, -1)
    lq = F.log_softmax(q_lm.table[: length - 1].detach(), -1).expand(3, -1, -1)
    assert torch.equal(ref.logprobs, lp.half())
    assert torch.equal(ref.nll, -lp.gather(-1, windows[:, 1:, None]).squeeze(-1))
    nll = -lq.gather(-1, windows[:, 1:, None]).squeeze(-1)
    p16, q16 = lp.half().float(), lq.half().float()
    kl = (p16.exp() * (p16 - q16)).sum(-1).flatten()
    assert out["ppl"] == float(torch.exp(nll.mean())) and out["window_nll"] == nll.mean(1).tolist()
    assert out["kl_mean"] == float(kl.mean()) and out["kl_p99"] == float(torch.quantile(kl, 0.99))
    top1 = q_lm.table[: length - 1].argmax(-1) == p_lm.table[: length - 1].argmax(-1)
    assert out["top1"] == float(top1.float().mean())

def test_reference_must_match_windows():
    lm = FixedLM([0.0, 0.0])
    ref = reference_logprobs(lm, torch.tensor([[0, 1]]), progress=False)
    with pytest.raises(ValueError, match="different windows"):
        evaluate(lm, torch.tensor([[1, 0]]), ref, progress=False)
    with pytest.raises(ValueError, match="n_windows, seq_len"):
        evaluate(lm, torch.tensor([0, 1]), progress=False)


@pytest.fixture(scope="module")
def reference(embedded):
    model, _ = embedded
    return reference_logprobs(model, emb.windows(128, 4), progress=False)


@pytest.mark.model
def test_perplexity_equals_transformers_loss(embedded, reference):
    """Our NLL per window is transformers' own shifted cross-entropy (labels=input_ids)."""
    model, _ = embedded
    w = emb.windows(128, 4)
    with torch.no_grad():
        losses = [float(model(input_ids=w[i : i + 1], labels=w[i : i + 1]).loss) for i in (0, 3)]
    assert reference.nll.mean(1)[[0, 3]].tolist() == pytest.approx(losses, rel=1e-5)


@pytest.mark.model
def test_identity_gives_zero_kl_and_full_agreement(embedded, reference):
    model, _ = embedded
    same, _ = quantize_model(model, {})  # empty recipe: every layer stays float
    # the reference's batch size: with two threads, a GEMM over two windows can round differently from one
    out = evaluate(same, reference.windows, reference, batch_size=1, progress=False)
    assert out["kl_mean"] == 0.0 and out["kl_p99"] == 0.0 and out["top1"] == 1.0
    assert out["ppl"] == pytest.approx(reference.perplexity, rel=1e-6)


@pytest.mark.model
def test_int8_channel_close_and_int2_tensor_far(embedded, reference):
    """On 4 windows of 128 tokens int8 per-channel moves PPL by < 1 % (measured -0.7 %)."""
    model, _ = embedded
    q8, _ = quantize_model(model, weight_only("int8-channel-sym-absmax"))
    r8 = evaluate(q8, reference.windows, reference, progress=False)
    del q8
    assert abs(r8["delta_ppl_pct"]) < 1.0
    assert 0 < r8["kl_mean"] < 0.01 and r8["top1"] > 0.9
    q2, _ = quantize_model(model, weight_only("int2-tensor-sym-absmax"))
    r2 = evaluate(q2, reference.windows, reference, progress=False)
    del q2
    assert r2["ppl"] > 10 * reference.perplexity
    assert r2["kl_mean"] > 100 * r8["kl_mean"] and r2["top1"] < 0.5


def test_paired_ppl_ratio_by_hand():
    # differences d = [0.1, 0.3]: mean 0.2, sd 0.141421 (n - 1), half-width 1.96 * 0.141421 / sqrt(2) = 0.196
    r = paired_ppl_ratio([3.1, 2.3], [3.0, 2.0])
    assert r["ratio"] == pytest.approx(math.exp(0.2))
    assert r["ci95"] == pytest.approx((math.exp(0.2 - 0.196), math.exp(0.2 + 0.196)), rel=1e-6)
    assert r["a_better"] == 0 and r["n_windows"] == 2
    same = paired_ppl_ratio([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["ratio"] == 1 and same["ci95"] == (1, 1)
    with pytest.raises(ValueError, match="equal-length"):
        paired_ppl_ratio([1.0, 2.0], [1.0])


def test_window_nll_by_hand():
    # p = (1/2, 1/4, 1/4): window [0, 1, 0] costs (log 4 + log 2) / 2, window [1, 0, 0] costs log 2
    lm = FixedLM(torch.log(torch.tensor([0.5, 0.25, 0.25])))
    out = evaluate(lm, torch.tensor([[0, 1, 0], [1, 0, 0]]), progress=False)
    assert out["window_nll"] == pytest.approx([1.5 * math.log(2), math.log(2)])
    assert sum(out["window_nll"]) / 2 == pytest.approx(out["nll"])


# ---- bad windows and broken models are refused with the fix (issue 16, items 7, 9, 15) ----

def test_windows_that_score_nothing_are_refused():
    lm = FixedLM([0.0, 0.0, 0.0])
    for fn in (evaluate, reference_logprobs):
        # one token per window scores no prediction (it gave perplexity nan)
        with pytest.raises(ValueError, match=r"windows of 1 token score nothing.*seq_len >= 2"):
            fn(lm, torch.tensor([[0], [1]]), progress=False)
        # no window at all (it gave a torch.cat error)
        with pytest.raises(ValueError, match=r"windows hold no window \(shape \(0, 8\)\): pass at least one"):
            fn(lm, torch.zeros(0, 8, dtype=torch.long), progress=False)
        with pytest.raises(ValueError, match="windows must hold integer token ids, got torch.float32"):
            fn(lm, torch.tensor([[0.0, 1.0]]), progress=False)


def test_out_of_vocabulary_ids_are_named():
    model = emb.tiny_llama(vocab=256, hidden=64, layers=1)
    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 300, 7]])
    for fn in (evaluate, reference_logprobs):  # used to raise IndexError: index out of range in self
        with pytest.raises(ValueError, match=r"token id 300 \(window 1, position 2\) outside the model's "
                                             r"vocabulary \[0, 256\): tokenize .* with the model's own tokenizer"):
            fn(model, windows, progress=False)
    with pytest.raises(ValueError, match=r"token id -1 \(window 0, position 0\)"):
        evaluate(model, torch.tensor([[-1, 2]]), progress=False)
    # a model without get_input_embeddings: the logits' width bounds the ids
    with pytest.raises(ValueError, match=r"token id 3 \(window 0, position 1\) outside the model's vocabulary \[0, 3\)"):
        evaluate(FixedLM([0.0, 0.0, 0.0]), torch.tensor([[0, 3]]), progress=False)


def test_a_nan_weight_is_refused_not_reported_as_perplexity_nan():
    model = emb.tiny_llama(vocab=256, hidden=64, layers=2)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = reference_logprobs(model, windows, progress=False)
    assert math.isfinite(evaluate(model, windows, ref, progress=False)["ppl"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[5, 7] = float("nan")
    # before: ppl nan, top1 0.0, no error
    with pytest.raises(ValueError, match=r"logits hold NaN or inf \(window 0\): no perplexity is reported.*non-finite"):
        evaluate(model, windows, ref, progress=False)
    with pytest.raises(ValueError, match="logits hold NaN or inf"):
        reference_logprobs(model, windows, progress=False)

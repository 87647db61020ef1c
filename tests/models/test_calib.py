"""Activation statistics from hooks, checked against inputs recomputed by hand."""
import pytest
import torch

from embedded import embedded  # noqa: F401
from qlab.models import calib


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_capture_inputs_is_the_normed_embedding(tiny, ids):
    """Layer 0's q_proj reads input_layernorm(embed(ids)): recompute it without hooks."""
    X = calib.capture_inputs(tiny, ids, "model.layers.0.self_attn.q_proj", batch_size=2)
    layer0 = tiny.model.layers[0]
    expected = layer0.input_layernorm(tiny.model.embed_tokens(ids)).reshape(-1, 64)
    assert X.shape == (60, 64)
    torch.testing.assert_close(X, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a linear"):
        calib.capture_inputs(tiny, ids, "model.layers.0")


@torch.no_grad()
def test_capture_inputs_of_several_layers_stops_early(tiny, ids):
    """One pass gives each layer's input as recomputed by hand, and nothing after the last one runs."""
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.v_proj"]
    calls = []
    probe = tiny.lm_head.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = calib.capture_inputs_of(tiny, ids, names, batch_size=2)
    finally:
        probe.remove()
    assert calls == []  # the head never ran: every pass stopped at layer 1's down_proj
    assert list(got) == names
    # recompute layer 1's inputs from layer 0's output without hooks
    h = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    block = tiny.model.layers[1]
    torch.testing.assert_close(got["model.layers.1.self_attn.v_proj"], block.input_layernorm(h).reshape(-1, 64))
    pos = torch.arange(ids.shape[1])[None]
    attn_out = block.self_attn(block.input_layernorm(h), position_embeddings=tiny.model.rotary_emb(h, pos),
                               attention_mask=None)[0]
    h2 = h + attn_out
    expected = block.mlp.act_fn(block.mlp.gate_proj(block.post_attention_layernorm(h2))) * \
        block.mlp.up_proj(block.post_attention_layernorm(h2))
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj"], expected.reshape(-1, 128))
    # the one-layer capture gives the same rows
    torch.testing.assert_close(got["model.layers.0.self_attn.o_proj"],
                               calib.capture_inputs(tiny, ids, "model.layers.0.self_attn.o_proj"))
    assert not tiny.lm_head._forward_pre_hooks and not block.mlp.down_proj._forward_pre_hooks
    with pytest.raises(ValueError, match="not linear"):
        calib.capture_inputs_of(tiny, ids, ["model.layers.0.mlp"])


@torch.no_grad()
def test_stats_match_the_captured_matrix(tiny, ids):
    stats = calib.input_stats(tiny, ids, percentiles=(50, 99), progress=False)
    assert len(stats) == 2 * 7 + 1  # 7 linears per layer + lm_head
    for name in ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj", "lm_head"]:
        A = calib.capture_inputs(tiny, ids, name).abs()
        s = stats[name]
        assert s.n_tokens == 60
        torch.testing.assert_close(s.max_abs, A.amax(0))
        torch.testing.assert_close(s.mean_abs, A.mean(0))
        # percentiles are taken on float16 copies of |x|: equal to fp16 precision
        torch.testing.assert_close(s.percentiles[50], torch.quantile(A, 0.5, dim=0), rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(s.percentiles[99], torch.quantile(A, 0.99, dim=0), rtol=2e-3, atol=1e-3)
    # q, k, v read one tensor: one shared accumulator
    assert stats["model.layers.0.self_attn.q_proj"] is stats["model.layers.0.self_attn.v_proj"]
    assert stats["model.layers.0.self_attn.q_proj"] is not stats["model.layers.0.self_attn.o_proj"]


def test_pattern_selects_and_rejects(tiny, ids):
    stats = calib.input_stats(tiny, ids[:1], pattern="*.mlp.down_proj", percentiles=(), progress=False)
    assert sorted(stats) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="no linear layer"):
        calib.input_stats(tiny, ids, pattern="*.nothing")


def test_outlier_channels_threshold():
    s = calib.ChannelStats(torch.tensor([1.0, 7.0, 0.5, 6.0, 2.0]), torch.ones(5), {}, 10)
    assert calib.outlier_channels({"x": s})["x"].tolist() == [1]
    assert s.outlier_ratio().tolist() == [0.5, 3.5, 0.25, 3.0, 1.0]  # median 2


@pytest.mark.model
@torch.no_grad()
def test_embedded_model_has_outlier_features_and_a_massive_first_token(embedded):
    """The claims notebook 04 shows, on one window of 128 calibration tokens."""
    model, tok = embedded
    from qlab.models.data import wikitext2_windows

    w = wikitext2_windows(tok, "calibration", 128, 1)
    stats = calib.input_stats(model, w, pattern="*.self_attn.q_proj", percentiles=(), progress=False)
    ratios = torch.stack([s.outlier_ratio() for s in stats.values()])  # [30, 576]
    assert (ratios.amax(1) > 10).sum() >= 10  # many layers have a channel 10x the median
    res = calib.residual_stream_abs(model, w)  # [31, 128]
    assert res.shape == (31, 128)
    assert res[1:-1, 0].amax() > 1000 and res[1:-1, 0].amax() > 20 * res[1:-1, 1:].amax()


def test_activation_quant_error_by_hand():
    """One value of 1000 sets a per-tensor int8 step of 1000/127 = 7.9: every N(0,1) value rounds to 0
    (relative error exactly 1 on the other tokens); keeping that channel or that token in float, or
    per-token scales, repairs it."""
    from qlab.core.error import rel_fro
    from qlab.core.quant import fake_quant

    X = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    X[0, 3] = 1000.0
    first = torch.zeros(10, dtype=torch.bool)
    first[0] = True
    err = lambda spec, **kw: calib.activation_quant_error(X, spec, measure_tokens=~first, **kw)  # noqa: E731
    assert err("int8-tensor-sym-absmax") == 1.0
    rest = X[1:]
    assert err("int8-tensor-sym-absmax", keep_tokens=first) == pytest.approx(rel_fro(rest, fake_quant(rest, "int8-tensor-sym-absmax")))
    cols = [0, 1, 2, 4, 5, 6, 7]
    with_float_col = X.clone()
    with_float_col[:, cols] = fake_quant(X[:, cols].contiguous(), "int8-tensor-sym-absmax")
    assert err("int8-tensor-sym-absmax", keep_channels=torch.tensor([3])) == pytest.approx(rel_fro(rest, with_float_col[1:]))
    assert err("int8-token-sym-absmax") < 0.01

"""qlab.study.lattice_plots: the hand decoders against Conway & Sloane's worked example and quip-sharp's codebook
(committed reference digest), the E8P scale curve against Max (1960) and the Gaussian bound, the rotation against
float64 round-off on a tiny Llama, and the AQLM group against a hand-built example."""
import hashlib
import json
import math
from pathlib import Path

import matplotlib
import pytest
import torch
from torch import nn

from qlab.core.formats.lattice import e8p_codebook, nearest_e8
from qlab.core.rotations import RandomizedHadamard, weight_incoherence
from qlab.core.tensor import CodebookTensor
from qlab.methods.weight.gptq import hessian, output_error
from qlab.methods.weight.rtn import rtn
from qlab.study.lattice_plots import (G_CLOSED_FORM, RotatedLinear, aqlm_group_steps, best_uniform_2bit_mse,
                                      distinct_group_values, e8_decode_steps, e8p_code_steps, e8p_mse_vs_scale,
                                      ldlq_vs_nearest, plot_g_estimates, plot_rotation_errors, plot_z2_vs_a2,
                                      quantize_rotated, rotation_error_table, rotation_exactness, rotation_sweep,
                                      two_bit_table, whole_model_rtn)

matplotlib.use("Agg")
REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "lattice" / "e8p_reference.json").read_text())


def test_closed_forms_are_conway_and_sloanes():
    # table 2.3 of "Sphere Packings, Lattices and Groups": A2 0.0801875, D4 0.0766032, E8 0.0716821
    assert G_CLOSED_FORM["A2"] == pytest.approx(0.0801875, abs=1e-7)
    assert G_CLOSED_FORM["E8"] == pytest.approx(0.0716821, abs=1e-7)
    assert 1 - G_CLOSED_FORM["E8"] * 12 == pytest.approx(0.1398, abs=1e-4)  # the seeds' "14%"


def test_e8_by_hand_on_conway_sloanes_example():
    s = e8_decode_steps([0.1, 0.1, 0.8, 1.3, 2.2, -0.6, -0.7, 0.9])
    assert s["D8"]["rounded"] == [0, 0, 1, 1, 2, -1, -1, 1] and s["D8"]["sum"] == 3 and s["D8"]["worst"] == 5
    assert s["D8"]["point"] == [0, 0, 1, 1, 2, 0, -1, 1]
    assert s["D8"]["distance2"] == pytest.approx(0.65) and s["D8+1/2"]["distance2"] == pytest.approx(0.95)
    assert s["coset"] == "D8" and s["point"] == s["D8"]["point"]


def test_e8_by_hand_equals_the_vectorized_decoder():
    x = 2.5 * torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hand = torch.tensor([e8_decode_steps(v)["point"] for v in x], dtype=torch.float64)
    assert torch.equal(hand, nearest_e8(x))
    with pytest.raises(ValueError, match="8-vector"):
        e8_decode_steps([0.0] * 7)


def test_e8p_by_hand_worked_example():
    # lattice.py's worked example: 0x0103 -> u = (-1/2, 1/2, -1/2, 1/2, 1/2, 1/2, 1/2, -3/2), point u + 1/4
    s = e8p_code_steps(0x0103)
    assert s["abs_index"] == 1 and s["parity"] == 0 and s["odd_pattern_flip"] and s["shift"] == 0.25
    assert s["u"] == [-0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.5, -1.5] and s["u_sum"] == 0
    s = e8p_code_steps(0x0001)  # odd sign byte: no sign flipped, the point moves by -1/4
    assert s["parity"] == 1 and s["sign_byte_even"] == 0 and s["point"] == [0.25] * 8


def test_e8p_by_hand_is_quip_sharps_codebook():
    # all 65,536 codes decoded one by one, hashed as tests/data/lattice/make_e8p_reference.py hashed quip-sharp's
    table = torch.tensor([e8p_code_steps(c)["point"] for c in range(1 << 16)], dtype=torch.float64)
    digest = hashlib.sha256((table * 4).round().to(torch.int8).numpy().tobytes()).hexdigest()
    assert digest == REFERENCE["sha256_code_order"]
    assert torch.equal(table, e8p_codebook())
    for bad in (-1, 1 << 16, 2.0):
        with pytest.raises(ValueError, match="0 .. 65535"):
            e8p_code_steps(bad)


def test_e8p_scale_curve_has_its_minimum_near_quip_sharps_opt_scale():
    df = e8p_mse_vs_scale([0.85, 1.03, 1.25], n_groups=6000, seed=0)
    mse = dict(zip(df["rms"], df["mse"]))
    assert mse[1.03] < mse[0.85] and mse[1.03] < mse[1.25]
    # between Shannon's D(2) = 1/16 and Max's best scalar 2-bit quantizer (0.1175)
    assert 0.0625 < mse[1.03] < 0.1175 - 0.015
    with pytest.raises(ValueError, match="positive"):
        e8p_mse_vs_scale([0.0], n_groups=10)


def test_best_uniform_2bit_matches_max_1960():
    step, mse = best_uniform_2bit_mse(n=400_000)
    assert step == pytest.approx(0.9957, abs=0.01) and mse == pytest.approx(0.1188, abs=0.0015)


def _spiky_layer(m=64, n=96, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * 0.05
    W[3, 7], W[-1, -2] = 1.5, -1.2  # two outliers: a coherent weight
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    X = torch.randn(tokens, n, generator=g) @ mix
    X[:, 5] *= 20  # one loud input channel: a coherent Hessian
    return W, X


def test_rotation_lowers_mu_and_helps_gptq_at_2_bits():
    W, X = _spiky_layer()
    R = RandomizedHadamard(*W.shape)
    assert weight_incoherence(R.weight(W.double())) < weight_incoherence(W) / 3
    df = rotation_sweep({"toy": (W, X)}, bits=(2,), methods=("gptq",))
    err = dict(zip(df["rotation"], df["rel_output_error"]))
    assert err[True] < err[False]
    # without the rotation the helper is plain RTN, bit for bit
    assert torch.equal(quantize_rotated(W, None, "rtn", 3, False), rtn(W, "int3-g128-asym-minmax").dequantize())
    with pytest.raises(ValueError, match="Hessian"):
        quantize_rotated(W, None, "gptq", 2, True)
    with pytest.raises(ValueError, match="'rtn' or 'gptq'"):
        quantize_rotated(W, None, "awq", 2, True)


def test_rotated_linear_is_the_same_function():
    lin = nn.Linear(96, 48, dtype=torch.float64)  # 96 = 12 * 8, 48 = 12 * 4: Paley sizes
    x = torch.randn(5, 96, dtype=torch.float64)
    assert (RotatedLinear(lin)(x) - lin(x)).abs().max() < 1e-13


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=8)  # 24 = 12*2, 48 = 12*4, 8
    return LlamaForCausalLM(cfg).eval()


def test_rotation_exactness_on_a_tiny_llama():
    model = _tiny_llama()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    r = rotation_exactness(model, torch.randint(0, 64, (1, 12)))
    assert r["n_rotated"] == 14  # 7 Linears per block
    assert 0 < r["max_hidden_diff"] < 1e-13 * r["max_hidden"] * 100
    assert r["max_logit_diff"] < 1e-6
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the model is untouched


def test_whole_model_rtn_on_a_tiny_llama():
    from qlab.eval.metrics import evaluate, reference_logprobs

    model = _tiny_llama()
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ref = reference_logprobs(model, windows, progress=False)
    df = whole_model_rtn(model, windows, ref, bits=(2, 8), rotate=(False, True, "v_proj"))
    assert len(df) == 6 and all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    ppl = df.set_index(["bits", "rotation"])["ppl"]
    assert abs(ppl[(8, False)] / ref.perplexity - 1) < 0.01 and ppl[(2, False)] != ppl[(2, True)]
    # the plain row is the model with each weight replaced by its RTN copy, evaluated directly
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not model.lm_head:
            m.weight.data = rtn(m.weight.data, "int2-g128-asym-minmax").dequantize()
    assert evaluate(model, windows, ref, progress=False)["ppl"] == pytest.approx(ppl[(2, False)], rel=1e-6)


def test_rotation_error_table_on_a_layer_that_ignores_its_loud_inputs():
    """A v_proj-like toy: three inputs carry most of H and the layer's weights on them are small. Plain RTN rounds
    those small weights mostly to the grid's exact zero; the rotation spreads its (smaller) error evenly over all
    inputs, the loud ones included, and the output error grows."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 96, generator=g)
    loud = [5, 40, 77]
    W[:, loud] *= 0.1
    X = torch.randn(4096, 96, generator=g)
    X[:, loud] *= 15
    G = torch.randint(0, 8, (48, 96), generator=g).float()
    G[:, [0, 64]], G[:, [1, 65]] = 0, 7  # every group of 64 spans the 8 levels: int3 min-max reproduces G / 64
    df = rotation_error_table({"toy": (W, hessian(X)), "on the grid": ((G - 3) / 64, hessian(X))}, bits=3,
                              group_size=64, top=3)
    for r in df[df.weight_error > 0].itertuples():  # the decomposition is exact
        assert r.output_error == pytest.approx(r.weight_error * r.error_align / r.W_align, rel=1e-9)
    plain, rotated, grid, grid_rotated = df.itertuples()
    assert plain.top_H > 0.85 and plain.W_align < 0.2 and plain.top_W < 0.02
    assert plain.top_error < 0.8 and plain.error_align < 0.4 and 0.9 < rotated.error_align < 1.1
    assert rotated.weight_error < plain.weight_error and rotated.output_error > 2 * plain.output_error
    assert 0.95 < plain.uniform_ratio < 1.05 and 0.95 < rotated.uniform_ratio < 1.05  # off any int3 grid
    assert grid.weight_error == 0 and grid.uniform_ratio == 0 and math.isnan(grid.error_align)
    assert 0.95 < grid_rotated.uniform_ratio < 1.05


def test_block_ldlq_beats_nearest_and_proxy_loss_is_the_output_error():
    W, X = _spiky_layer(m=32, n=64)
    r = ldlq_vs_nearest(W, X)
    assert r["BlockLDLQ"]["proxy_loss"] < r["nearest"]["proxy_loss"]
    for v in r.values():  # tr(E H E^T) / tr(W H W^T) in the rotated basis == ||X E^T||^2 / ||X W^T||^2
        assert v["proxy_loss"] == pytest.approx(v["rel_output_error"], rel=1e-5)


def test_aqlm_group_by_hand():
    # aqlm.py's worked example: C_1 = [[1, 0], [0, 1]], C_2 = [[.5, .5], [0, 0]], codes (1, 0), scale 2 -> [1, 3]
    books = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.0, 0.0]]])
    t = CodebookTensor((1, 2), torch.tensor([[[1]], [[0]]], dtype=torch.int32), books, torch.tensor([2.0]), 1)
    g = aqlm_group_steps(t, 0, 0)
    assert g["codes"] == [1, 0] and g["sum"] == [0.5, 1.5] and g["group"] == [1.0, 3.0]
    assert torch.equal(torch.tensor([g["group"]]), t.dequantize())
    with pytest.raises(ValueError, match="row must be"):
        aqlm_group_steps(t, 1, 0)


def test_distinct_group_values_counts_collisions():
    books = torch.tensor([[[0.0], [1.0]], [[0.0], [1.0]]])  # 0+0, 0+1, 1+0, 1+1: only 3 distinct sums
    assert distinct_group_values(books) == 3
    assert distinct_group_values(torch.tensor([[[0.0], [1.0]], [[0.0], [2.0]]])) == 4


def test_two_bit_table_reads_sweep_rows(tmp_path):
    for key, label, ppl in (("a", "RTN int2 g128", 3.4e6), ("b", "QuIP# E8P", 87.9)):
        (tmp_path / f"{key}.json").write_text(json.dumps({"label": label, "ppl": ppl, "quantized_bpw": 2.0}))
    df = two_bit_table(tmp_path)
    assert df["label"].tolist() == ["QuIP# E8P", "RTN int2 g128"]
    assert two_bit_table(tmp_path / "none").empty


def test_figures_carry_their_numbers():
    fig = plot_z2_vs_a2({"A2": (0.0802, 0.0001)})
    assert "0.0802 ± 0.0001" in fig.axes[1].get_title() and len(fig.axes) == 2
    import pandas as pd

    t = pd.DataFrame({"lattice": ["Z1", "E8"], "G": [0.0833, 0.0717], "se": [1e-4, 1e-4],
                      "closed_form": [1 / 12, G_CLOSED_FORM["E8"]]})
    assert [lbl.get_text() for lbl in plot_g_estimates(t).axes[0].get_yticklabels()] == ["Z1", "E8"]
    df = pd.DataFrame({"layer": ["l"] * 4, "method": ["RTN", "RTN", "GPTQ", "GPTQ"], "bits": [2] * 4,
                       "rotation": [False, True] * 2, "rel_output_error": [0.1, 0.2, 0.05, 0.03]})
    assert [a.get_title() for a in plot_rotation_errors(df).axes] == ["RTN", "GPTQ"]
    matplotlib.pyplot.close("all")

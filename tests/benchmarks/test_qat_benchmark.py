"""The QAT benchmark (qlab.benchmarks.qat) on a tiny Llama: the loss and recovery arithmetic by hand, the
untrained student is RTN, two steps train and a killed run resumes to the same weights; and, when torchao's
venv is there (``make qat-peer``), torchao's round to nearest equals qlab's bit for bit and its QAT runs."""
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qlab.benchmarks import qat
from qlab.eval import reference_logprobs
from qlab.models.walker import quantize_model, weight_only

RUN = qat.QATRun("int4", "int4-g64-asym-minmax-sfp32", steps=3, seq_len=16, batch=2, lr=1e-3, warmup=1)


def tiny_llama():
    """2 layers, hidden 128, SwiGLU 320 (rows divisible by 64, as torchao's groups need), tied embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (6, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


def test_recovered_fraction_by_hand():
    assert qat.recovered(0.20, 0.05) == pytest.approx(0.75)
    assert qat.recovered(0.10, 0.10) == 0.0
    assert qat.recovered(0.10, 0.15) == pytest.approx(-0.5)  # worse than RTN: negative
    with pytest.raises(ValueError, match="RTN's KL must be > 0"):
        qat.recovered(0.0, 0.0)


def test_recovered_perplexity_gap_by_hand():
    row = {"ppl": 25.8, "ppl_ref": 23.2, "rtn": {"ppl": 30.7}}
    assert qat.recovered_ppl(row) == pytest.approx((30.7 - 25.8) / (30.7 - 23.2))  # 0.6533...
    with pytest.raises(ValueError, match="above the float model's"):
        qat.recovered_ppl({"ppl": 20.0, "ppl_ref": 23.2, "rtn": {"ppl": 23.0}})


def test_kd_loss_is_the_kl_of_teacher_to_student_by_hand():
    # P = softmax(0, ln 3) = (1/4, 3/4), Q = softmax(0, 0) = (1/2, 1/2)
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    student = torch.zeros(1, 1, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.1308...
    assert float(qat.kd_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(qat.kd_loss(teacher, teacher)) == 0.0
    # a mean over positions: a second position with KL 0 halves it
    both = qat.kd_loss(torch.cat([student, teacher], 1), torch.cat([teacher, teacher], 1))
    assert float(both) == pytest.approx(expected / 2, rel=1e-6)


def test_code_flips_and_flip_backs_by_hand():
    flips = qat.CodeFlips()
    assert flips.update(torch.tensor([0, 1, 2, 3])) == (None, None)
    assert flips.update(torch.tensor([0, 2, 2, 3])) == (1, None)  # one code moved up
    assert flips.update(torch.tensor([0, 1, 2, 2])) == (2, 1)  # it moved back (a flip-back); another moved
    assert flips.update(torch.tensor([0, 1, 2, 3])) == (1, 1)  # and so did that one


def test_batches_are_a_function_of_the_step():
    w = torch.arange(10).reshape(5, 2)
    assert qat.batch_at(w, 0, 2).tolist() == [[0, 1], [2, 3]]
    assert qat.batch_at(w, 2, 2).tolist() == [[8, 9], [0, 1]]  # wraps around


def test_calibration_and_evaluation_articles_are_disjoint():
    text = qat.check_split()
    assert "8 articles" in text and "54 articles" in text and "no article in both" in text


def test_untrained_student_converts_to_the_rtn_model(tiny, windows):
    _, evals = windows
    ref = reference_logprobs(tiny, evals, progress=False)
    row = qat.rtn_row(tiny, RUN, ref, progress=False)
    rtn, _ = quantize_model(tiny, weight_only(RUN.spec))  # qlab's walker, round to nearest
    from qlab.eval import evaluate

    out = evaluate(rtn, evals, ref, progress=False)
    assert row["kl_mean"] == out["kl_mean"] and row["ppl"] == out["ppl"]
    from qlab.core.quant import quantize

    qt = quantize(tiny.model.layers[0].mlp.down_proj.weight.detach(), RUN.spec)
    assert row["quantized_bpw"] == pytest.approx(qt.bits_per_weight)


def test_two_steps_train_and_a_killed_run_resumes_to_the_same_weights(tiny, windows, tmp_path, monkeypatch):
    train_windows, _ = windows
    straight = qat.make_student(tiny, RUN)
    log, records = qat.train_qat(tiny, straight, train_windows, RUN, progress=False)
    assert log.steps == 3 and records[0]["loss"] > 0  # the quantized student starts away from the teacher
    assert records[0]["flips"] is None and records[1]["flips"] > 0  # lr 1e-3 moves codes of the tracked layer
    assert all(r["loss"] == l for r, l in zip(records, log.losses))

    real_batch_at = qat.batch_at

    def dies_at_step_2(w, step, batch):
        if step == 2:
            raise KeyboardInterrupt  # killed after the checkpoint of step 2
        return real_batch_at(w, step, batch)

    killed = qat.make_student(tiny, RUN)
    monkeypatch.setattr(qat, "batch_at", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        qat.train_qat(tiny, killed, train_windows, RUN, tmp_path, every=1, progress=False)
    monkeypatch.setattr(qat, "batch_at", real_batch_at)
    resumed = qat.make_student(tiny, RUN)
    log2, records2 = qat.train_qat(tiny, resumed, train_windows, RUN, tmp_path, every=1, progress=False)
    assert log2.resumed_from == 2 and log2.losses == log.losses
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    saved = json.loads((tmp_path / "steps.json").read_text())
    assert sorted(map(int, saved)) == [0, 1, 2]
    other = replace(RUN, spec="int3-g64-asym-minmax-sfp32")
    with pytest.raises(ValueError, match="different configuration"):  # another spec in the same folder: refused
        qat.train_qat(tiny, qat.make_student(tiny, other), train_windows, other, tmp_path, progress=False)


def test_run_one_row_has_the_issue_columns(tiny, windows):
    train_windows, evals = windows
    ref = reference_logprobs(tiny, evals, progress=False)
    run = qat.QATRun("int3", "int3-g64-asym-minmax-sfp32", steps=2, seq_len=16, batch=2, lr=1e-3, warmup=1)
    row = qat.run_one(tiny, train_windows, ref, run, progress=False)
    assert row["steps_done"] == 2 and len(row["losses"]) == 2 and len(row["flips"]) == 2
    assert row["recovered_kl"] == pytest.approx((row["rtn"]["kl_mean"] - row["kl_mean"]) / row["rtn"]["kl_mean"])
    assert row["peak_rss_gb"] > 0 and 0 <= row["top1"] <= 1
    control = qat.run_one(tiny, train_windows, ref, qat.QATRun("float", None, steps=2, seq_len=16, batch=2),
                          progress=False)
    assert control["losses"][0] == 0.0 and "rtn" not in control  # the float student starts as the teacher


# ---- torchao, in its own venv ------------------------------------------------------------------------
PEER = Path(os.environ.get("QLAB_TORCHAO_PEER", qat.DEFAULT_PEER))


@pytest.mark.skipif(not (PEER / "bin" / "python").exists(), reason=f"no torchao venv at {PEER} (make qat-peer)")
def test_torchao_rtn_is_qlabs_bit_for_bit_and_its_qat_trains(tiny, windows, tmp_path):
    train_windows, evals = windows
    folder = tmp_path / "model"
    tiny.save_pretrained(folder)
    ref = reference_logprobs(tiny, evals, progress=False)
    run = qat.QATRun("torchao-int4-g64", "int4-g64-asym-minmax-sfp32", steps=2, seq_len=16, batch=2, lr=1e-3,
                     warmup=1)
    row = qat.torchao_row(tiny, train_windows, ref, run, tmp_path / "runs", folder, peer=PEER)
    # torchao's converted int4 asym g64 = qlab's int4-g64-asym-minmax-sfp32 (the embedded model: all but 8,518 of
    # 106M values, rounding ties; this seeded tiny model has none)
    block = [m for n, m in tiny.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    assert row["rtn_values"] == sum(m.weight.numel() for m in block)
    assert row["same_rtn_as_qlab"] and row["rtn_values_differing"] == 0
    assert row["steps_done"] == 2 and row["losses"][0] > 0
    assert row["rtn"]["kl_mean"] > 0 and row["kl_mean"] != row["rtn"]["kl_mean"]  # training moved the weights
    assert row["versions"]["torchao"].startswith("0.18")


# ---- GPTQ and AWQ at the same specs --------------------------------------------------------------------
class _ByteTokenizer:
    """Token = byte value: drives a tiny model through the real WikiText-2 data path of run_sweep."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


def _load_tiny(name):
    import embedded

    return embedded.tiny_llama(vocab=256, hidden=64, layers=2), _ByteTokenizer()


def test_gptq_and_awq_rows_use_each_weight_only_spec_once():
    runs = [RUN, replace(RUN, name="float", spec=None), replace(RUN, name="w4a8", act_spec=qat.ACT_INT8_TOKEN),
            replace(RUN, name="torchao-int4-g64"), qat.PTQ_ONLY["ternary-ptq"],
            replace(RUN, name="int3", spec="int3-g128-asym-minmax")]
    configs = qat.ptq_configs(runs, calib_windows=4)
    assert [c["label"] for c in configs] == ["gptq:int4-g64-asym-minmax-sfp32", "awq:int4-g64-asym-minmax-sfp32",
                                             "gptq:int3-g128-asym-minmax", "awq:int3-g128-asym-minmax"]
    assert configs[0]["recipe"] == {qat.BLOCKS: "gptq:int4-g64-asym-minmax-sfp32"}
    assert {c["calib_windows"] for c in configs} == {4}
    assert qat.ptq_configs([replace(RUN, name="float", spec=None)]) == []


def test_gptq_and_awq_rows_beside_qat_on_the_same_windows(tmp_path):
    from qlab.eval.sweep import EvalProtocol, run_sweep

    protocol = EvalProtocol(seq_len=32, n_windows=2, pick="first")
    spec = "int2-g32-asym-minmax"
    ptq = qat.ptq_rows([replace(RUN, spec=spec)], tmp_path, protocol, calib_windows=4, load=_load_tiny)
    rtn = run_sweep([{"label": "rtn", "recipe": {qat.BLOCKS: spec}}], protocol, tmp_path / "rtn", progress=False,
                    load=_load_tiny).iloc[0]
    assert set(ptq) == {spec} and set(ptq[spec]) == {"gptq", "awq"}
    for m in ("gptq", "awq"):
        assert ptq[spec][m]["ppl_ref"] == rtn["ppl_ref"]  # the same evaluation windows and float reference
        assert ptq[spec][m]["quantized_bpw"] == rtn["quantized_bpw"]  # the same grid: equal bits per weight
    assert ptq[spec]["gptq"]["kl_mean"] < rtn["kl_mean"]  # GPTQ's error feedback helps at 2 bits
    # the table puts them on the QAT run's line, and on no line of another spec
    row = {"name": "int2", "steps_done": 3, "ppl": 1.0, "ppl_ref": 1.0, "kl_mean": 0.1, "top1": 0.5,
           "run": {"spec": spec}, "rtn": {"ppl": 2.0, "kl_mean": 0.2, "top1": 0.4}, "recovered_kl": 0.5}
    t = qat.table([row, {**row, "name": "other", "run": {"spec": "int8-channel-sym-absmax"}}], ptq)
    assert t.kl_gptq.tolist()[0] == ptq[spec]["gptq"]["kl_mean"] and t.kl_awq.tolist()[0] == ptq[spec]["awq"]["kl_mean"]
    assert t.kl_gptq.isna().tolist() == [False, True]

"""The resumable training loop on a tiny QAT Llama: kill and resume, foreign checkpoints, NaN losses."""
import pytest
import torch
import torch.nn.functional as F

from qlab.methods.train import prepare, train
from qlab.methods.train.loop import CHECKPOINT

CONFIG = {"spec": "int4-g32", "model": "tiny_llama"}
IDS = torch.randint(0, 256, (4, 8, 17), generator=torch.Generator().manual_seed(0))  # 4 batches of 8 x 17 tokens


def _model():
    from embedded import tiny_llama

    return prepare(tiny_llama(), {"model.layers.*": "int4-g32"})


def loss_at(model, step):
    batch = IDS[step % len(IDS)]  # the batch is a function of the step: a resumed run sees the same data
    logits = model(batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


class Killed(Exception):
    pass


def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path):
    straight = _model()
    log = train(straight, loss_at, CONFIG, steps=10, lr=1e-3, folder=tmp_path / "a", every=3, warmup=2,
                cosine=True, progress=False)
    assert log.steps == 10 and log.resumed_from == 0
    assert log.losses[-1] < log.losses[0]

    def dies_at_step_8(model, step):
        if step == 8:
            raise Killed
        return loss_at(model, step)

    with pytest.raises(Killed):
        train(_model(), dies_at_step_8, CONFIG, steps=10, lr=1e-3, folder=tmp_path / "b", every=3, warmup=2,
              cosine=True, progress=False)
    assert len(torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["losses"]) == 6  # saved at steps 3, 6

    resumed = _model()  # a fresh process: new model, new optimizer, same call
    log_b = train(resumed, loss_at, CONFIG, steps=10, lr=1e-3, folder=tmp_path / "b", every=3, warmup=2, cosine=True,
                  progress=False)
    assert log_b.resumed_from == 6
    assert log_b.losses == log.losses
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "b").glob("*.tmp"))  # atomic writes leave no temporary file behind


def test_a_checkpoint_from_another_configuration_is_refused(tmp_path):
    train(_model(), loss_at, CONFIG, steps=2, lr=1e-3, folder=tmp_path, every=1, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(_model(), loss_at, dict(CONFIG, spec="int3-g32"), steps=2, lr=1e-3, folder=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        train(_model(), loss_at, CONFIG, steps=2, lr=2e-3, folder=tmp_path, progress=False)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    def nan_at_step_5(model, step):
        loss = loss_at(model, step)
        return loss * float("nan") if step == 5 else loss

    model = _model()
    with pytest.raises(FloatingPointError, match=r"at step 5; .*last good checkpoint \(step 4\)"):
        train(model, nan_at_step_5, CONFIG, steps=10, lr=1e-3, folder=tmp_path, every=2, progress=False)
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert len(saved["losses"]) == 4 and all(torch.isfinite(torch.tensor(saved["losses"])))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never reached the weights


def test_model_keeps_its_mode_and_the_progress_bar_runs(tmp_path, capsys):
    model = _model().eval()
    train(model, loss_at, CONFIG, steps=2, lr=1e-3, progress=True)
    assert not model.training
    assert "train: 100%" in capsys.readouterr().err


def test_nothing_to_train_raises():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        train(model, lambda m, s: m(torch.ones(2)).sum(), {}, steps=1, lr=1e-3, progress=False)

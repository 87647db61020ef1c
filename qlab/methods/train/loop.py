"""A small resumable training loop: checkpoints every N steps, refuses foreign checkpoints, stops on NaN.

    log = train(model, loss_at, config={"spec": "int4-g128", "data": "calibration, 256 tokens"},
                steps=200, lr=1e-4, folder="runs/qat-int4", every=50, warmup=10, cosine=True)
    plt.plot(log.losses)                                        # the loss curve; a tqdm bar shows progress

``loss_at(model, step)`` returns the loss of one step; its batch must be a function of the step (e.g.
``windows[step % n]``) so that a resumed run sees the same data as an uninterrupted one. Each checkpoint
(``folder/checkpoint.pt``, written to a temporary file and renamed, so a kill mid-write leaves the previous
one intact) holds the model, the AdamW state, the RNG state, the losses so far and ``config``. Running the
same call again resumes from it and ends with exactly the weights of an uninterrupted run; a checkpoint
whose ``config`` differs raises. A non-finite loss stops training with an error naming the step, before
that step touches the weights or the checkpoint.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlab.core.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainLog:
    """What a run did: ``losses[i]`` is the loss of step i (for every step so far, resumed ones included)."""

    losses: list = field(default_factory=list)
    resumed_from: int = 0  # the step the run started at (0: from scratch)

    @property
    def steps(self) -> int:
        return len(self.losses)


def _canonical(config: dict) -> str:
    try:
        return json.dumps(config, sort_keys=True, default=str)
    except TypeError as e:
        raise ValueError(f"config must be a dict of plain values (it identifies the run): {e}") from None


def _save(path: Path, state: dict):
    with atomic_path(path) as tmp:  # the checkpoint is either the old one or the new one
        torch.save(state, tmp)


def lr_factor(step: int, steps: int, warmup: int = 0, cosine: bool = False) -> float:
    """The learning rate of ``step`` as a fraction of the peak: linear warm-up over ``warmup`` steps, then
    constant, or a cosine decay to 0 at ``steps`` (a pure function of the step, so resuming needs no state).

    >>> [round(lr_factor(s, 10, warmup=2, cosine=True), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(model: torch.nn.Module, loss_at, config: dict, steps: int, lr: float, folder=None, every: int = 50,
          seed: int = 0, weight_decay: float = 0.0, warmup: int = 0, cosine: bool = False,
          progress: bool = True) -> TrainLog:
    """Train ``model`` with AdamW for ``steps`` steps (see the module docstring); returns a TrainLog.

    ``folder=None`` trains without checkpoints. ``config`` (plain values) names the run; ``steps``, ``lr``,
    ``seed``, ``weight_decay``, ``warmup`` and ``cosine`` (the schedule, :func:`lr_factor`) are added to it
    before the comparison with a checkpoint's. The model is left in the mode (train/eval) it came in.
    """
    if steps < 1 or every < 1 or warmup < 0:
        raise ValueError(f"steps and every must be >= 1 and warmup >= 0, got steps={steps}, every={every}, "
                         f"warmup={warmup}")
    config = dict(config, steps=steps, lr=lr, seed=seed, weight_decay=weight_decay, warmup=warmup, cosine=cosine)
    identity = _canonical(config)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires a gradient: nothing to train")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    torch.manual_seed(seed)
    log = TrainLog()
    path = None if folder is None else Path(folder) / CHECKPOINT
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            state = torch.load(path, weights_only=False)
            if state["config"] != identity:
                raise ValueError(f"{path} was made with a different configuration:\n  saved: {state['config']}\n"
                                 f"  now:   {identity}\nuse another folder, or delete it to start over")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
            log = TrainLog(list(state["losses"]), resumed_from=len(state["losses"]))

    saved = log.steps if path is not None else 0  # the step of the checkpoint on disk (0: none)
    was_training = model.training
    model.train()
    try:
        with tqdm(range(log.steps, steps), initial=log.steps, total=steps, disable=not progress, desc="train") as bar:
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(step, steps, warmup, cosine)
                loss = loss_at(model, step)
                value = float(loss.detach())
                if not math.isfinite(value):
                    kept = f"the last good checkpoint (step {saved}) is kept in {path}" if saved \
                        else "no checkpoint was written"
                    raise FloatingPointError(f"the loss is {value} at step {step}; training stopped, {kept}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                log.losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                done = step + 1
                if path is not None and (done % every == 0 or done == steps):
                    _save(path, {"config": identity, "model": model.state_dict(), "rng": torch.get_rng_state(),
                                 "optimizer": optimizer.state_dict(), "losses": log.losses})
                    saved = done
    finally:
        model.train(was_training)
    return log

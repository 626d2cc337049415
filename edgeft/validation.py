"""Validation loss during training and the adapter kept for it: the step with the lowest loss.

The validation set is never the build's ``[data].eval`` file: that file measures task accuracy and
fidelity after training, and picking a checkpoint on it would leak it into the result. It is
``[data].validation`` when given, else a seeded share of the training conversations
(``[train].validation_share``), held out before training sees them.

The best adapter must survive a killed run like the rest of the training state, without adding
checkpoints (which would move where a killed run resumes) or making ``save_steps`` change the
result. So each evaluation that improves on the best writes the adapter weights to
``best-STEP.safetensors`` in the run's checkpoint folder *before* any checkpoint can refer to it; a
checkpoint's trainer state holds the evaluation history up to its step, so a resumed run's best so
far is the minimum of that history, read back from the file of that step. After each checkpoint
only the file of the current best is kept.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

from .data import Example
from .errors import ConfigError

EVALUATIONS_PER_RUN = 10  # with eval_steps = 0


def split_validation(examples: list[Example], share: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, validation): round(share × n) conversations, at least one, chosen by ``seed``.

    The rest keep their file order, so the training data order depends on the seed alone as before."""
    n = len(examples)
    k = max(1, round(share * n))
    if k >= n:
        raise ConfigError(
            f"[train].validation_share = {share:g} holds out all {n} training conversations; "
            "lower it or give [data].validation"
        )
    held = set(random.Random(seed).sample(range(n), k))
    return [ex for i, ex in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def eval_every(eval_steps: int, total_steps: int) -> int:
    """``[train].eval_steps``, or for 0 about EVALUATIONS_PER_RUN evaluations over ``total_steps``."""
    return eval_steps if eval_steps > 0 else max(1, math.ceil(total_steps / EVALUATIONS_PER_RUN))


def history(log_history: list[dict[str, Any]], key: str) -> list[dict[str, float]]:
    """``[{step, loss}]`` of Trainer's log entries that carry ``key`` (``loss`` or ``eval_loss``)."""
    return [{"step": int(h["step"]), "loss": round(float(h[key]), 6)} for h in log_history if key in h]


def best_of(evals: list[dict[str, float]]) -> dict[str, float] | None:
    """The first evaluation with the lowest loss (a later tie does not replace it), or None."""
    best = None
    for e in evals:
        if best is None or e["loss"] < best["loss"]:
            best = e
    return best


def make_keep_best(model: Any, folder: Path | None) -> Any:
    """A ``TrainerCallback`` that keeps the adapter weights of ``model`` (a peft model) with the lowest
    validation loss, beside the checkpoints in ``folder`` when there is one (see the module doc).

    It also asks for an evaluation at the last step, so the final adapter is always a candidate."""
    from transformers import TrainerCallback

    class _KeepBest(TrainerCallback):
        def __init__(self) -> None:
            self.step: int | None = None
            self.loss: float | None = None
            self.weights: dict[str, Any] | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            # A resumed run: Trainer restored the history up to the checkpoint before this call.
            best = best_of(history(state.log_history, "eval_loss"))
            if best is not None and folder is not None:
                from safetensors.torch import load_file

                self.step, self.loss = best["step"], best["loss"]
                self.weights = load_file(_path(folder, self.step))

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_evaluate = True

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = round(float(metrics["eval_loss"]), 6)  # as recorded in the history
            if self.loss is not None and not loss < self.loss:
                return
            from peft import get_peft_model_state_dict

            self.step, self.loss = state.global_step, loss
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
            if folder is not None and state.is_world_process_zero:
                _write(folder, self.step, self.weights)

        def on_save(self, args, state, control, **kwargs):
            if folder is not None and state.is_world_process_zero and self.step is not None:
                keep = _path(folder, self.step).name
                for p in folder.glob("best-*"):
                    if p.name != keep:
                        p.unlink(missing_ok=True)

    return _KeepBest()


def _path(folder: Path, step: int) -> Path:
    return Path(folder) / f"best-{step}.safetensors"


def _write(folder: Path, step: int, weights: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    final = _path(folder, step)
    tmp = final.with_name(f"best-{step}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    os.replace(tmp, final)  # a kill mid-write never leaves a half file under the name a checkpoint refers to

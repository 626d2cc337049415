"""The training part of a build's report: the train stage's loss histories and the loss-curve PNG.

report.json's ``training`` holds what :func:`training_summary` keeps of the train manifest; report.md
gets :func:`markdown_section`; ``loss.png`` (:func:`write_loss_plot`) is train and validation loss
against the optimizer step with the kept step marked. matplotlib is optional: without it the PNG is
skipped and report.md says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import save_figure

LOSS_PLOT = "loss.png"
_KEYS = (
    "method",
    "steps",
    "validation",
    "eval_steps",
    "best_step",
    "best_eval_loss",
    "final_is_best",
    "train_loss_history",
    "eval_loss_history",
)


def training_summary(train_results: dict[str, Any]) -> dict[str, Any]:
    """The report's ``training`` section from the train stage's manifest results (missing keys: None)."""
    out = {k: train_results.get(k) for k in _KEYS}
    for k in ("train_loss_history", "eval_loss_history"):
        out[k] = out[k] or []  # adapters trained before validation existed
    return out


def write_loss_plot(training: dict[str, Any], path: Path) -> bool:
    """Train and validation loss vs step, the kept step marked. False when matplotlib is missing or
    there is no history to draw."""
    train, evals = training["train_loss_history"], training["eval_loss_history"]
    if not train and not evals:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display, no GUI toolkit
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train (logged mean)", alpha=0.8)
    if evals:
        ax.plot([h["step"] for h in evals], [h["loss"] for h in evals], marker="o", label="validation")
    if training.get("best_step") is not None:
        ax.axvline(training["best_step"], color="grey", linestyle="--", linewidth=1)
        ax.scatter([training["best_step"]], [training["best_eval_loss"]], s=120, marker="*", zorder=3, color="C3")
        ax.annotate(
            f"kept: step {training['best_step']}",
            (training["best_step"], training["best_eval_loss"]),
            textcoords="offset points",
            xytext=(6, 8),
            fontsize=8,
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"{training.get('method') or 'training'} loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def markdown_section(training: dict[str, Any], plotted: bool) -> list[str]:
    """report.md's training lines: which adapter was kept and why, and the loss curve (or why not)."""
    lines = ["", "## Training", ""]
    val = training.get("validation")
    if training.get("best_step") is None:
        lines.append(
            f"{training.get('steps')} steps; no validation set, so the last step's adapter was kept."
            if val is None
            else "No validation loss was recorded."
        )
    else:
        kept = "the last step" if training.get("final_is_best") else "not the last step"
        lines.append(
            f"Validation loss {_every(training['eval_steps'])} and at the last step, on {val['examples']} conversations "
            f"({val['source']}); kept: step {training['best_step']} of {training['steps']} "
            f"(validation loss {training['best_eval_loss']:.4f}, {kept})."
        )
    if plotted:
        lines += ["", f"![train and validation loss]({LOSS_PLOT})"]
    elif training["train_loss_history"] or training["eval_loss_history"]:
        lines += ["", f"(no {LOSS_PLOT}: matplotlib is not installed; `pip install 'edgeft[plot]'`)"]
    return lines


def _every(steps: int) -> str:
    return "every step" if steps == 1 else f"every {steps} steps"

"""The training section of a report: loss.png drawn from the histories, and a build without matplotlib."""

from __future__ import annotations

import sys

from edgeft.training_report import markdown_section, training_summary, write_loss_plot

RESULTS = {
    "method": "lora",
    "steps": 6,
    "validation": {"source": "held out of the training data", "examples": 4},
    "eval_steps": 2,
    "train_loss_history": [{"step": s, "loss": 3.0 - 0.3 * s} for s in range(1, 7)],
    "eval_loss_history": [{"step": 2, "loss": 2.5}, {"step": 4, "loss": 2.2}, {"step": 6, "loss": 2.4}],
    "best_step": 4,
    "best_eval_loss": 2.2,
    "final_is_best": False,
    "train_seconds": 1.0,  # not part of the report's section
}


def test_the_loss_curve_is_a_png_and_report_md_links_it(tmp_path):
    training = training_summary(RESULTS)
    assert "train_seconds" not in training and training["best_step"] == 4
    assert write_loss_plot(training, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = "\n".join(markdown_section(training, plotted=True))
    assert "kept: step 4 of 6 (validation loss 2.2000, not the last step)" in md
    assert "every 2 steps" in md and "![train and validation loss](loss.png)" in md


def test_without_matplotlib_the_png_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    training = training_summary(RESULTS)
    assert not write_loss_plot(training, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
    md = "\n".join(markdown_section(training, plotted=False))
    assert "no loss.png: matplotlib is not installed" in md and "](loss.png)" not in md


def test_a_run_without_validation_says_the_last_adapter_was_kept():
    training = training_summary({"method": "lora", "steps": 3, "train_loss_history": [{"step": 3, "loss": 1.0}]})
    assert training["eval_loss_history"] == [] and training["validation"] is None
    assert "no validation set, so the last step's adapter was kept" in "\n".join(markdown_section(training, True))

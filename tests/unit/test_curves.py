"""The curves picture drawn from a job's metrics history, its redraw throttle, and its failures."""

from pathlib import Path

import pytest
from pictures import assert_shows_curves
from PIL import Image

from llama_stack_provider_trl import curves, history


def dpo_history(job_dir, steps=8):
    for step in range(1, steps + 1):
        history.append(job_dir, step, {"loss": 0.7 / step, "rewards/margins": 0.3 * step,
                                       "rewards/accuracies": min(1.0, 0.2 * step)}, total_steps=steps)
        if step % 4 == 0:
            history.append(job_dir, step, {"eval_loss": 0.8 / step})


def test_a_dpo_history_is_drawn_with_its_panels(tmp_path):
    dpo_history(tmp_path)
    assert curves.draw(tmp_path, "dpo", "DPO job") == tmp_path / "curves.png"
    assert_shows_curves(tmp_path / "curves.png", validation=True)
    with Image.open(tmp_path / "curves.png") as image:
        assert image.width > 2.5 * image.height  # three panels side by side: loss, reward margin, reward accuracy
    assert {p.name for p in tmp_path.iterdir()} == {"curves.png", "metrics.jsonl"}  # no scratch file left behind


def test_nothing_is_drawn_before_anything_is_logged(tmp_path):
    assert curves.draw(tmp_path, "sft") is None
    history.append(tmp_path, 1, {"grad_norm": 1.0})  # nothing a panel shows
    assert curves.draw(tmp_path, "sft") is None
    assert not (tmp_path / "curves.png").exists()


def test_an_sft_history_is_drawn_with_loss_and_token_accuracy(tmp_path):
    for step in (1, 2, 3):
        history.append(tmp_path, step, {"loss": 3.0 / step, "mean_token_accuracy": 0.1 * step})
    history.append(tmp_path, 3, {"eval_loss": 2.0, "eval_mean_token_accuracy": 0.25})
    curves.draw(tmp_path, "sft", "SFT job")
    assert_shows_curves(tmp_path / "curves.png", validation=True)
    with Image.open(tmp_path / "curves.png") as image:
        assert 1.5 * image.height < image.width < 2.5 * image.height  # two panels: loss, token accuracy


def test_redrawer_is_throttled_reports_the_path_once_and_a_failure_as_one_warning(tmp_path, monkeypatch):
    reports = []
    redrawer = curves.Redrawer(tmp_path, "dpo", "t", lambda **fields: reports.append(fields), every_s=3600)
    dpo_history(tmp_path, steps=2)
    redrawer.maybe()  # within every_s of the start: no drawing yet
    assert reports == [] and not (tmp_path / "curves.png").exists()
    redrawer.every_s = 0
    redrawer.maybe()
    assert_shows_curves(tmp_path / "curves.png")
    redrawer.now()
    assert reports == [{"curves": str(tmp_path / "curves.png")}]  # said once, however often it is redrawn

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(curves, "draw", broken)
    redrawer.now()  # must not raise: a picture never fails a job
    redrawer.now()
    assert reports[1:] == [{"warnings": ["training curves could not be drawn: OSError: No space left on device"]}]


@pytest.mark.parametrize("given,expected", [
    ("none", []), (None, []), ("tensorboard", ["tensorboard"]), ("tensorboard,trackio", ["tensorboard", "trackio"]),
    (["trackio"], ["trackio"]), (["none"], []),
])
def test_report_to_takes_a_name_a_list_or_none(given, expected):
    from llama_stack_provider_trl.config import TrlPostTrainingConfig

    assert TrlPostTrainingConfig(report_to=given).report_to == expected


def test_report_to_a_tracker_that_is_not_installed_is_refused_naming_the_key(monkeypatch):
    import importlib.util

    from pydantic import ValidationError

    from llama_stack_provider_trl.config import TrlPostTrainingConfig

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ValidationError, match="report_to: 'trackio' is not installed"):
        TrlPostTrainingConfig(report_to=["tensorboard", "trackio"])
    with pytest.raises(ValidationError, match="report_to"):
        TrlPostTrainingConfig(report_to="wandb")


def test_the_readme_shows_the_demo_jobs_picture():
    repo = Path(__file__).resolve().parents[2]
    assert "](docs/curves.png)" in (repo / "README.md").read_text()
    assert_shows_curves(repo / "docs" / "curves.png")

import json

from llama_stack_provider_trl import history


def test_rows_of_one_step_are_merged_and_later_values_win(tmp_path):
    history.append(tmp_path, 1, {"loss": 0.7, "rewards/margins": 0.0, "note": "text"}, total_steps=4, epoch=0.25)
    history.append(tmp_path, 2, {"loss": 0.6, "grad_norm": float("nan")}, total_steps=4)
    history.append(tmp_path, 2, {"eval_loss": 0.65})
    history.append(tmp_path, 1, {"loss": 0.69})  # logged again after resuming from an earlier checkpoint
    rows = history.read(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.69 and rows[0]["rewards/margins"] == 0.0 and "note" not in rows[0]
    assert rows[1]["loss"] == 0.6 and rows[1]["eval_loss"] == 0.65 and "grad_norm" not in rows[1]
    assert rows[0]["total_steps"] == 4 and rows[0]["epoch"] == 0.25


def test_a_line_still_being_written_is_skipped(tmp_path):
    history.append(tmp_path, 1, {"loss": 0.7})
    with history.path(tmp_path).open("a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.5})[:9])
    assert [r["step"] for r in history.read(tmp_path)] == [1]
    assert history.read(tmp_path / "missing") == []


def test_a_step_keeps_the_time_its_training_loss_was_logged(tmp_path):
    lines = [{"step": 10, "time": 100.0, "loss": 0.69}, {"step": 10, "time": 105.0, "eval_loss": 0.7},
             {"step": 10, "time": 107.0, "train_loss": 0.69, "train_runtime": 3.0}]
    history.path(tmp_path).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (row,) = history.read(tmp_path)
    assert row["time"] == 100.0 and row["eval_loss"] == 0.7 and row["train_runtime"] == 3.0
    with history.path(tmp_path).open("a") as f:  # the step trained and logged again after a resume
        f.write(json.dumps({"step": 10, "time": 200.0, "loss": 0.68}) + "\n")
    (row,) = history.read(tmp_path)
    assert row["time"] == 200.0 and row["loss"] == 0.68

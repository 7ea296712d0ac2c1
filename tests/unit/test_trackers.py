"""report_to: a real one-step TRL run sends its metrics to TensorBoard and trackio, both writing locally under
the provider's output_dir (the job's own tensorboard/ directory; one trackio database for all jobs)."""

import json
import sqlite3

from test_dpo_losses import one_step_trainer

from llama_stack_provider_trl.recipes.common import TRACKIO_DIR, TRACKIO_PROJECT


def test_report_to_tensorboard_and_trackio_log_the_job_locally(tmp_path, tiny_model, monkeypatch):
    for name in ("TENSORBOARD_LOGGING_DIR", "TRACKIO_DIR"):  # the recipe sets them; put them back afterwards
        monkeypatch.delenv(name, raising=False)
    trainer = one_step_trainer(tmp_path, tiny_model, {"loss_type": "sigmoid"}, report_to=["tensorboard", "trackio"])
    trainer.train()

    (events,) = (tmp_path / "loss" / "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes()  # the scalar's tag, as TensorBoard shows it

    database = tmp_path / TRACKIO_DIR / f"{TRACKIO_PROJECT}.db"
    with sqlite3.connect(database) as db:  # trackio's own table of logged metrics
        logged = {(run, json.loads(metrics).get("train/loss")) for run, metrics in
                  db.execute("select run_name, metrics from metrics")}
    assert ("loss", trainer.state.log_history[0]["loss"]) in logged, logged  # the run is named after the job

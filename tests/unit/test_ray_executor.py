"""The ray executor's start-up errors and failure messages, without a cluster (tests/integration/test_ray.py
runs jobs on a real one)."""

import sys

import pytest
from ray.exceptions import ActorDiedError
from stack_server import free_port

from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.executors import make_executor
from llama_stack_provider_trl.worker.ray_train import describe_ray_failure


def test_ray_missing_fails_start_up_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(RuntimeError, match=r"install the provider's \[ray\] extra"):
        make_executor(TrlPostTrainingConfig(executor="ray"))


def test_an_unreachable_cluster_fails_start_up_naming_the_address():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeError, match=f"ray_address '{address}': cannot reach the Ray cluster's head"):
        make_executor(TrlPostTrainingConfig(executor="ray", ray_address=address))


def test_a_malformed_address_fails_start_up_naming_it():
    with pytest.raises(RuntimeError, match="ray_address 'head-without-port': expected host:port"):
        make_executor(TrlPostTrainingConfig(executor="ray", ray_address="head-without-port"))


class WorkerGroupError(Exception):
    """Ray Train's error shape: worker_failures maps ranks to their exceptions."""

    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


class DeadWorker(ActorDiedError):
    def __str__(self):  # Ray 2.60's text for a worker process killed by SIGKILL, shortened
        return ("The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n"
                "The actor is dead because its worker process has died. Worker exit type: UNEXPECTED_SYSTEM_EXIT "
                "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file. "
                "Some common causes include: (1) the process was killed by the OOM killer")


def test_a_dead_worker_is_named_as_the_cause_not_the_errors_of_the_ranks_it_left_behind():
    failure = describe_ray_failure(WorkerGroupError({0: RuntimeError("rank 0 failed"), 1: DeadWorker()}))
    assert failure["worker_died"] is True
    assert failure["error"] == (
        "rank 1: its Ray worker process died (Worker unexpectedly exits with a connection error code 2. End of "
        "file): the kernel's out-of-memory killer, a crash, or the loss of its node is the usual cause; not "
        "retried (FailureConfig max_failures=0)")


def test_other_ray_failures_keep_their_first_line():
    raised = describe_ray_failure(WorkerGroupError({0: ValueError("bad row\nTraceback ...")}))
    assert raised == {"worker_died": False, "error": "Ray Train worker failed: rank 0: bad row"}
    assert describe_ray_failure(RuntimeError("controller gone"))["error"] == "Ray Train failed: controller gone"

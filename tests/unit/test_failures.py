"""How a dead worker's end is put into words."""

import signal

from llama_stack_provider_trl.failures import describe_exception, describe_exit, root_cause

# the summary torchrun (torch 2.14) logs when a rank dies; rank 0 was then stopped by torchrun itself
TORCHRUN_LOG = """\
E1127 02:05:03.949000 12195 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1
Failures:
[1]:
  time      : 2026-11-27_02:05:03
  host      : vm
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 12224)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 12224
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-27_02:05:03
  host      : vm
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 12225)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 12225
"""


def test_the_root_cause_is_the_rank_torchrun_saw_fail_first():
    assert root_cause(TORCHRUN_LOG) == (1, -9)
    assert root_cause("no summary here") is None
    message = describe_exit(1, TORCHRUN_LOG)
    assert message.startswith("rank 1 was killed by SIGKILL: the kernel's out-of-memory killer is the usual cause")


def test_signals_and_exit_codes_of_a_single_worker():
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV) and "segmentation fault" in describe_exit(-signal.SIGSEGV)
    assert describe_exit(-signal.SIGKILL).startswith("the worker process was killed by SIGKILL")
    assert describe_exit(3) == ("the worker process exited with code 3 without reporting an error "
                                "(see the job's worker.log)")


def test_exceptions_name_their_usual_cause():
    assert describe_exception(OSError(28, "No space left on device")).startswith("disk full while writing")
    assert describe_exception(RuntimeError("CUDA out of memory. Tried")).startswith("out of memory")
    assert describe_exception(ValueError("")) == "ValueError: no message"

"""How a job's end is put into words: an exception in training, or a worker process that died.

A status that says "failed" and nothing else sends users to the server's log; these messages name
what happened and its usual cause. No torch here: the server describes dead workers with it.
"""

from __future__ import annotations

import errno
import re
import signal

# The usual causes of a worker dying by signal, as users meet them.
SIGNAL_CAUSES = {
    signal.SIGKILL: "the kernel's out-of-memory killer is the usual cause (lower batch_size or max_seq_length, "
                    "or free memory), or another process killed it",
    signal.SIGSEGV: "a segmentation fault in native code (a CUDA kernel, a compiled library) or corrupted memory",
    signal.SIGBUS: "a bus error: often a full /dev/shm or a file that shrank while it was mapped",
    signal.SIGABRT: "a native library aborted (see the job's worker.log)",
    signal.SIGTERM: "something outside the provider asked it to stop",
}
# torchrun's summary of the rank that failed first ("Root Cause"): its rank and exit code
_ROOT_CAUSE = re.compile(r"rank\s*:\s*(\d+)[^\n]*\n(?:.*\n)*?\s*exitcode\s*:\s*(-?\d+)")


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip() or "no message"
    if type(exc).__name__ in ("OutOfMemoryError",) or "out of memory" in text.lower():
        return f"out of memory: {text}"
    # safetensors reports ENOSPC as its own error type, so match the OS's message too
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in text:
        return f"disk full while writing: {text}"
    return f"{type(exc).__name__}: {text}"


def root_cause(launcher_log: str) -> tuple[int, int] | None:
    """(rank, exit code) of the rank torchrun saw fail first, from the summary it logs; a negative code is
    a signal. The other ranks' errors are usually consequences (a peer's connection reset)."""
    match = None
    for match in _ROOT_CAUSE.finditer(launcher_log):
        pass  # the last summary is the one for this attempt
    return (int(match.group(1)), int(match.group(2))) if match else None


def describe_exit(returncode: int, launcher_log: str = "") -> str:
    """A worker (or torchrun, which reports its ranks' exit codes in its log) ended without saying why."""
    who = "the worker process"
    cause = root_cause(launcher_log)
    if cause is not None:
        who, returncode = f"rank {cause[0]}", cause[1]
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"{who} was killed by signal {-returncode}"
        cause = SIGNAL_CAUSES.get(sig, "see the job's worker.log")
        return f"{who} was killed by {sig.name}: {cause}"
    return f"{who} exited with code {returncode} without reporting an error (see the job's worker.log)"

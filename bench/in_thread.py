"""Run plain_trl.py's main() in a non-main thread (as the server's training thread does), to separate
the cost of training off the main thread from everything else the server does.

    python bench/in_thread.py MODEL DATA OUT [plain_trl options]
"""

import os
import runpy
import sys
import threading
from pathlib import Path

if __name__ == "__main__":
    if os.environ.get("BENCH_MALLOC_ARENA_FIX"):
        # the fix under test: same malloc behaviour in the training thread as in the main thread
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fix = os.environ["BENCH_MALLOC_ARENA_FIX"]
        if fix == "arena":
            libc.mallopt(-8, 1)  # M_ARENA_MAX: threads share the main arena
        elif fix == "thresholds":
            ok = (libc.mallopt(-3, 512 * 2**20),  # M_MMAP_THRESHOLD: no mmap/munmap per large tensor
                  libc.mallopt(-1, 1024 * 2**20))  # M_TRIM_THRESHOLD: keep freed memory instead of trimming it
            print("mallopt", ok, file=sys.stderr)
        elif fix == "trim":
            print("mallopt", libc.mallopt(-1, 1024 * 2**20), file=sys.stderr)
    sys.argv = [str(Path(__file__).with_name("plain_trl.py")), *sys.argv[1:]]
    error = []

    def target():
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)

    t = threading.Thread(target=target, name="trainer")
    t.start()
    t.join()
    if error:
        raise error[0]

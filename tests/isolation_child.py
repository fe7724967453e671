"""A child for ``tests/test_isolation.py``: each item names what the child does with it.

    python -m tests.isolation_child REPORT_FILE ITEM...

- ``ok-*``: reports the item, with the child's pid (so that a test can tell children apart);
- ``hang``: says it runs case ``hang-case``, then never returns;
- ``abort``: says it runs case ``abort-case``, then kills itself with SIGABRT;
- ``fatal``: reports an illegal memory access, then stops as a worker whose CUDA context is lost;
- ``hog``: holds ever more memory, 64 MiB at a time, up to 2 GiB (then it hangs);
- ``grandchild``: starts a process of its own (its pid is the case it says it runs), then hangs.

It imports only the standard library, so that it starts in a tenth of a second, not the seconds
torch takes: the tests' time limits can then be a few seconds without a slow start tripping them.
So it speaks ``harness.isolation``'s protocol itself: one JSON object a line, appended to
REPORT_FILE, and exit status ``FATAL_EXIT_STATUS`` after a fatal error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FATAL_EXIT_STATUS = 3  # harness.isolation.FATAL_EXIT_STATUS; tests/test_isolation.py checks that they agree
HANG_S = 120  # longer than any test's limit; an orphan (its test process killed) ends by itself


def send(report: str, message: dict) -> None:
    with open(report, "a") as handle:
        handle.write(json.dumps(message) + "\n")


def main(argv: list[str]) -> int:
    report = argv[1]
    for item in argv[2:]:
        send(report, {"started": item})
        if item == "hang":
            send(report, {"case": "hang-case"})
            time.sleep(HANG_S)
        elif item == "abort":
            send(report, {"case": "abort-case"})
            os.abort()
        elif item == "fatal":
            send(report, {"item": item, "error": "CUDA error: an illegal memory access was encountered"})
            return FATAL_EXIT_STATUS
        elif item == "hog":
            held = []
            while len(held) < 32:
                held.append(bytearray(64 * 2**20))  # zero-filled, so resident
                time.sleep(0.02)
            time.sleep(HANG_S)
        elif item == "grandchild":
            grandchild = subprocess.Popen(["sleep", str(HANG_S)])
            send(report, {"case": str(grandchild.pid)})
            time.sleep(HANG_S)
        else:
            send(report, {"item": item, "pid": os.getpid()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

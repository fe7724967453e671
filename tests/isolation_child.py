"""A child for ``tests/test_isolation.py``: each item names what the child does with it.

    python -m tests.isolation_child REPORT_FILE ITEM...

- ``ok-*``: reports the item, with the child's pid (so that a test can tell children apart);
- ``hang``: says it runs case ``hang-case``, then never returns;
- ``abort``: says it runs case ``abort-case``, then kills itself with SIGABRT;
- ``fatal``: reports an illegal memory access, then stops as a worker whose CUDA context is lost;
- ``hog``: holds ever more memory, 64 MiB at a time, up to 2 GiB (then it hangs);
- ``grandchild``: starts a process of its own (its pid is the case it says it runs), then hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from harness.isolation import FATAL_EXIT_STATUS, child_report


def main(argv: list[str]) -> int:
    report = child_report(argv[1])
    for item in argv[2:]:
        report.send({"started": item})
        if item == "hang":
            report.send({"case": "hang-case"})
            time.sleep(600)
        elif item == "abort":
            report.send({"case": "abort-case"})
            os.abort()
        elif item == "fatal":
            report.send({"item": item, "error": "CUDA error: an illegal memory access was encountered"})
            return FATAL_EXIT_STATUS
        elif item == "hog":
            held = []
            while len(held) < 32:
                held.append(bytearray(64 * 2**20))  # zero-filled, so resident
                time.sleep(0.02)
            time.sleep(600)
        elif item == "grandchild":
            grandchild = subprocess.Popen(["sleep", "600"])
            report.send({"case": str(grandchild.pid)})
            time.sleep(600)
        else:
            report.send({"item": item, "pid": os.getpid()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""One ``sdterm`` command line in this fresh process, for ``sdterm bench --cold``: runs it, then
writes its exit code and this process's peak resident set (bytes) as JSON to the file named
first: ``python -m sdterm.bench.cold_child OUT.json generate PROMPT --model ...``."""

from __future__ import annotations

import json
import sys
import time


def peak_rss() -> int | None:
    """This process's peak resident set in bytes: Linux's VmHWM (the high-water mark of this
    address space, which starts anew at exec), else getrusage's ru_maxrss, which Linux carries
    over from the parent across fork and exec (the bench's own peak would show through)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main(argv: list[str]) -> int:
    """Runs the command; the JSON also has when this ``main`` began and when the command returned
    (``time.time()``: the parent, which knows when it spawned the process and when it ended, splits
    the wall time into the interpreter's start, the command, and the exit)."""
    began = time.time()
    out, args = argv[0], argv[1:]
    from sdterm.cli import main as sdterm_main

    code = sdterm_main(args)
    returned = time.time()
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"code": code, "peak_rss": peak_rss(), "began": began, "returned": returned}, f)
    return code


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])  # (importing sdterm.cli first would move its import out of "command")
    from sdterm.cli import finish

    finish(exit_code)  # the exit the sdterm script takes (cli._leave)

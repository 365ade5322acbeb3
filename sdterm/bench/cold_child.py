"""One ``sdterm`` command line in this fresh process, for ``sdterm bench --cold``: runs it, then
writes its exit code and this process's peak resident set (bytes) as JSON to the file named
first: ``python -m sdterm.bench.cold_child OUT.json generate PROMPT --model ...``. With
``--twice`` before the command it runs it twice in this process (the second render finds
everything loaded: the steady render next to the first)."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    out, args = argv[0], argv[1:]
    times = 1
    if args and args[0] == "--twice":
        times, args = 2, args[1:]
    from sdterm.cli import main as sdterm_main

    code = 0
    for _ in range(times):
        code = code or sdterm_main(args)
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    except ImportError:  # Windows: no getrusage
        peak = None
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"code": code, "peak_rss": peak}, f)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

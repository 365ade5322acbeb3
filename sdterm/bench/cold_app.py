"""The app's start-up and its first renders in this fresh process, for ``sdterm bench --cold``:
``python -m sdterm.bench.cold_app OUT.json PROMPT [the app's flags]``.

It starts the way ``sdterm`` (the app) does, without a screen: the flags through the app's own
parser and ``app_start``, then ``AppModels.load`` (the model opened, the engine set up, and on a
GPU the throwaway render at the starting size that the app makes while the user types). Then it
renders two prompts new to the embedding cache, as a user types them ("PROMPT, take 1" and
"PROMPT, take 2": the text encoder runs in both), through the render service (nothing saved or
recorded). It writes as JSON to OUT: when the models were ready (``time.time()``: the parent knows
when it spawned the process), both renders' seconds, whether each ran the text encoder, and the
process's peak resident set.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    out, prompt, flags = argv[0], argv[1], argv[2:]
    from pathlib import Path

    from sdterm.bench.cold_child import peak_rss
    from sdterm.cli import build_parser
    from sdterm.cli.app import AppModels, app_start

    args = build_parser().parse_args(flags)
    if args.command is not None:
        raise SystemExit(f"cold_app: give the app's flags, not a command ({args.command})")
    _, model, params, _ = app_start(args)
    models = AppModels(args, model, Path(args.outdir or "."), None, warm=params)
    service = models.load(None, lambda _text: None)
    ready = time.time()
    seconds, encoded = [], []
    for i in range(2):
        result = service.render(params.replace(prompt=f"{prompt}, take {i + 1}"))
        seconds.append(result.seconds)
        encoded.append(not result.stages[0].skipped)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"peak_rss": peak_rss(), "ready": ready, "seconds": seconds, "text_encoded": encoded}, f)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    from sdterm.cli import finish

    finish(code)

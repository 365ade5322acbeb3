"""``/lora``'s edit of the prompt text: add a ``<lora:NAME:W>`` tag, change its weight, take it out.
Pure text; no UI, no files."""

from __future__ import annotations

import math
import re

from .errors import shorten
from .prompt_syntax import NetworkTagError, extra_networks, lora_tag


def edit_loras(prompt: str, arg: str) -> tuple[str, str]:
    """``/lora NAME[:W]``: ``prompt`` with ``<lora:NAME:W>`` (W: 1) at its end, or in place of a tag
    of NAME it has; ``/lora -NAME``: without NAME's tags. (the new prompt, a notice). ValueError
    (one line) for a weight that isn't a number or a bad tag already in the prompt."""
    try:
        tags = [t for t in extra_networks(prompt)[1] if t.kind == "lora"]
    except NetworkTagError as exc:
        raise ValueError(f"the prompt's {exc}") from None
    if arg.startswith("-"):
        name = arg[1:].strip()
        gone = [t for t in tags if t.name == name]
        for tag in gone:
            prompt = re.sub(r" ?" + re.escape(tag.text), "", prompt, count=1)
        return prompt.strip(), (f"LoRA {name} taken out of the prompt" if gone else f"no LoRA {name} in the prompt")
    name, colon, weight = arg.rpartition(":") if ":" in arg else (arg, "", "1")
    try:
        number = float(weight)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not name.strip() or ">" in arg or "<" in arg:
        raise ValueError(f"/lora NAME[:W] takes a name and a weight (a number), got {shorten(arg)!r}")
    tag = lora_tag(name.strip(), number)
    same = [t for t in tags if t.name == name.strip()]
    prompt = prompt.replace(same[0].text, tag, 1) if same else f"{prompt.rstrip()} {tag}".lstrip()
    return prompt, f"{tag} {'set' if same else 'added'}: Enter renders with it"

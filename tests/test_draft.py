"""Draft mode (issue 15) in the session and the commands: what a render uses while it is on, the
full settings kept aside, the full-quality request, the parameter line, a draft render recalled,
and the LoRA parts (the parameter line's summary of the prompt's tags, /lora's edit, completion)."""

from __future__ import annotations

import random

import pytest

from sdterm import paths
from sdterm.commands import Command, CommandError, complete, parse_command
from sdterm.history import History
from sdterm.lora_edit import edit_loras
from sdterm.params import Params
from sdterm.session import Session, describe_networks
from sdterm.settings import DraftSettings

FULL = dict(sampler="DPM++ 2M", schedule="Karras", steps=20, cfg=7.0, width=64, height=48, negative="fog")


def session(tmp_path, lora: str = "", **params) -> Session:
    return Session(Params(**{**FULL, **params}), History(tmp_path / "h.jsonl"), random.Random(1),
                   draft=DraftSettings(lora=lora))


def test_draft_mode_renders_with_the_draft_settings_and_keeps_the_full_ones(tmp_path):
    s = session(tmp_path)
    s.apply(parse_command("/draft"))
    assert s.draft
    req = s.new_prompt("a fox")
    assert (req.sampler, req.steps, req.cfg, req.prompt) == ("LCM", 4, 1.5, "a fox")
    assert (req.width, req.height, req.negative, req.seed) == (64, 48, "fog", s.params.seed)
    assert (s.params.sampler, s.params.schedule, s.params.steps, s.params.cfg) == ("DPM++ 2M", "Karras", 20, 7.0)
    # every way to a render goes through it: the seed keys, reroll, Enter on the image
    for again in (s.nudge_seed(1), s.reroll(), s.rerender(), s.change_variation(0.05)):
        assert (again.sampler, again.steps, again.cfg) == ("LCM", 4, 1.5)
    # the full settings may still be changed while drafting, for later
    s.apply(Command("steps", "30"))
    assert s.new_prompt("owl").steps == 4 and s.params.steps == 30
    s.apply(parse_command("/draft off"))
    req = s.new_prompt("owl")
    assert (req.sampler, req.schedule, req.steps, req.cfg) == ("DPM++ 2M", "Karras", 30, 7.0)


def test_the_draft_lora_is_appended_at_render_time_not_twice(tmp_path):
    s = session(tmp_path, lora="lcm-sd15")
    s.set_draft(True)
    assert s.new_prompt("a fox").prompt == "a fox <lora:lcm-sd15:1>"
    assert s.new_prompt("").prompt == "<lora:lcm-sd15:1>"
    assert s.new_prompt("a fox <lora:lcm-sd15:0.7>").prompt == "a fox <lora:lcm-sd15:0.7>"  # the user's own weight
    assert s.last_prompt == "a fox <lora:lcm-sd15:0.7>"
    s.set_draft(False)
    assert s.new_prompt("a fox").prompt == "a fox"


def test_full_quality_is_the_last_image_with_the_full_settings_and_draft_stays_on(tmp_path):
    s = session(tmp_path, lora="lcm")
    assert s.full_quality() is None
    s.set_draft(True)
    draft = s.new_prompt("a fox")
    draft = s.nudge_seed(3)
    full = s.full_quality()
    assert s.draft
    assert (full.prompt, full.seed, full.width, full.height) == ("a fox", draft.seed, 64, 48)
    assert (full.sampler, full.schedule, full.steps, full.cfg) == ("DPM++ 2M", "Karras", 20, 7.0)
    assert s.rerender().steps == 4  # and the next render is a draft again


def test_parameter_line_in_draft_mode(tmp_path):
    s = session(tmp_path)
    normal = s.describe()
    assert "DRAFT" not in normal and "DPM++ 2M Karras · 20 steps · CFG 7" in normal
    s.set_draft(True)
    line = s.describe()
    assert line.startswith("DRAFT LCM 4 steps cfg 1.5 · seed random")
    assert line.endswith("full: DPM++ 2M Karras 20 steps CFG 7")
    assert "20 steps ·" not in line
    s.draft_settings = DraftSettings(lora="lcm-sd15", steps=6)
    assert s.describe().startswith("DRAFT LCM 6 steps cfg 1.5 + lcm-sd15 ·")
    s.set_draft(False)
    assert s.describe() == normal


def test_a_recalled_draft_render_comes_back_with_the_full_settings(tmp_path):
    s = session(tmp_path, lora="lcm")
    s.set_draft(True)
    draft = s.new_prompt("a fox")
    s.set_draft(False)
    s.apply(Command("cfg", "5"))
    assert s.is_draft(draft) and not s.is_draft(s.request("a fox"))
    s.restore(draft)
    assert s.last_prompt == "a fox" and s.params.seed == draft.seed and s.recalled
    assert (s.params.sampler, s.params.steps, s.params.cfg) == ("DPM++ 2M", 20, 5.0)
    assert s.rerun(s.last_prompt).steps == 20  # Enter renders that seed in full
    # a render with other settings is restored as it was
    other = Params(prompt="owl", sampler="Euler a", steps=9, cfg=3.0, seed=5)
    s.restore(other)
    assert (s.params.sampler, s.params.steps, s.params.cfg, s.last_prompt) == ("Euler a", 9, 3.0, "owl")


def test_draft_command_errors(tmp_path):
    s = session(tmp_path)
    with pytest.raises(CommandError, match="on or off"):
        s.apply(Command("draft", "maybe"))
    assert not s.draft
    assert "draft on" in s.apply(Command("draft", "on")).message
    assert "draft on" in s.apply(Command("draft", "on")).message  # on stays on
    assert "draft off" in s.apply(Command("draft", "")).message


def test_describe_networks():
    assert describe_networks("a fox") == ("", False)
    assert describe_networks("a <lora:detail:0.8> fox <lora:lcm:1>") == ("LoRA detail×0.8, lcm×1", False)
    assert describe_networks("<lora:x:1:0.5>") == ("LoRA x te×1 unet×0.5", False)
    assert describe_networks("<lora:[bold]x:1>") == ("LoRA [bold]x×1", False)
    text, bad = describe_networks("a <lora:x:abc>")
    assert bad and "abc" in text and "\n" not in text
    assert "hypernet" in describe_networks("<hypernet:h:1>")[0]


def test_edit_loras():
    assert edit_loras("a fox", "detail:0.8") == ("a fox <lora:detail:0.8>", "<lora:detail:0.8> added: Enter renders with it")
    assert edit_loras("a <lora:detail:0.5> fox", "detail")[0] == "a <lora:detail:1> fox"
    assert edit_loras("a <lora:detail:0.5> fox", "-detail")[0] == "a fox"
    assert "no LoRA" in edit_loras("a fox", "-detail")[1]
    for bad in ("x:abc", "x:inf", ":1", "a<b:1"):
        with pytest.raises(ValueError, match="/lora"):
            edit_loras("a fox", bad)
    with pytest.raises(CommandError):
        Session(Params(), History.__new__(History)).apply(Command("lora", "x:abc"))


def test_vae_and_lora_completion(tmp_path):
    from sdterm.ui.addons import lora_values, vae_values

    paths.vae_dir().mkdir(parents=True)
    (paths.vae_dir() / "ft-mse.safetensors").write_bytes(b"")
    (paths.vae_dir() / "notes.txt").write_bytes(b"")
    paths.lora_dir().mkdir(parents=True)
    (paths.lora_dir() / "detail-tweaker.safetensors").write_bytes(b"")
    values = {"vae": vae_values, "lora": lora_values}
    assert complete("/vae f", values) == "/vae ft-mse.safetensors"
    assert complete("/vae d", values) == "/vae default"
    assert complete("/vae n", values) is None
    assert complete("/lora de", values) == "/lora detail-tweaker"
    assert complete("/lora -d", values) == "/lora -detail-tweaker"


def test_the_app_takes_its_draft_settings_from_sdterm_yaml(tmp_path, monkeypatch):
    from sdterm.cli import build_parser
    from sdterm.cli.app import app_session
    from sdterm.resolve import apply_defaults, user_config

    monkeypatch.setenv("SDTERM_CONFIG_DIR", str(tmp_path))
    (tmp_path / "sdterm.yaml").write_text("draft:\n  sampler: Euler a\n  steps: 6\n  cfg: 2\n  lora: lcm15\n")
    args = build_parser().parse_args([])
    cfg = user_config()
    apply_defaults(args, cfg)
    s = app_session(args, cfg, Params(seed=3), History(tmp_path / "h.jsonl"), None)
    s.draft = True
    req = s.request("a fox")
    assert (req.sampler, req.steps, req.cfg) == ("Euler a", 6, 2.0) and req.prompt.endswith("<lora:lcm15:1>")

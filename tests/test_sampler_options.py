"""Samplers, schedules and RNGs around the engine (issue 13): the infotext as A1111 1.10 writes and
reads it, the command-line flags, the slash commands with their completion, the parameter line and
``sdterm show``'s generate line."""

from __future__ import annotations

import argparse
import random

import pytest

from sdterm.commands import CommandError, complete, parse_command, sampler_label
from sdterm.history import History
from sdterm.options import add_render_options, params_from_args
from sdterm.params import Params
from sdterm.pngmeta import infotext, params_from_infotext
from sdterm.samplers import RNGS, SAMPLER_LIST, SAMPLERS, SCHEDULES, resolve_schedule
from sdterm.session import Session
from sdterm.show import generate_command, notes

BASE = "a fox\nNegative prompt: blurry\n"


def a1111(settings: str) -> Params:
    return params_from_infotext(BASE + settings).params


# ---- the infotext ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [s.name for s in SAMPLER_LIST])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("rng", RNGS)
def test_every_sampler_schedule_and_rng_round_trips_through_the_text(sampler, schedule, rng):
    p = Params("a fox", "blurry", seed=5, steps=20, sampler=sampler, schedule=schedule, rng=rng, ensd=31337,
               eta_ancestral=0.5, eta=0.25).validated()
    text = infotext(p, "m", "h")
    assert f"Sampler: {sampler}, " in text  # the name alone; the schedule has its own key
    back = params_from_infotext(text)
    q = back.params
    assert (q.sampler, back.sampler, back.get("sampler")) == (sampler, sampler, sampler)
    assert resolve_schedule(q.sampler, q.schedule) == resolve_schedule(sampler, schedule)  # the same sigmas
    assert q.rng == ("nv" if rng == "gpu" else rng)  # no RNG key means A1111's GPU noise: nv, on any device
    info = SAMPLERS[sampler]
    assert q.eta == (0.25 if sampler == "DDIM" else 0.0)
    assert q.eta_ancestral == (0.5 if info.uses_eta and info.k_diffusion else 1.0)
    assert q.ensd == (31337 if sampler == "DDIM" or info.ancestral else 0)  # where it changes the noise
    assert back.extra == {}


@pytest.mark.parametrize(
    "sampler, schedule, written",
    [
        ("DDIM", "Automatic", None), ("Euler a", "Automatic", None), ("Euler", "Uniform", "Uniform"),
        ("DPM++ 2M", "Automatic", "Karras"), ("DPM++ 2M", "Karras", "Karras"), ("DPM++ 2M", "Exponential", "Exponential"),
        ("DPM++ 2M SDE", "Automatic", "Exponential"), ("DPM2", "Automatic", "Karras"), ("LMS", "Karras", "Karras"),
        ("UniPC", "Automatic", None),
    ],
)
def test_schedule_type_is_written_as_a1111_writes_it(sampler, schedule, written):
    text = infotext(Params("x", sampler=sampler, schedule=schedule), "m", "h")
    line = text.split("\n")[-1]
    expected = f"Steps: 50, Sampler: {sampler}, " + (f"Schedule type: {written}, " if written else "") + "CFG scale: 7.5"
    assert line.startswith(expected)


def test_the_ddim_text_is_the_old_one_and_rng_cpu():
    line = infotext(Params("x", seed=3), "m", "h").split("\n")[-1]
    assert line == "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model hash: h, Model: m, RNG: CPU"


def test_ensd_rng_and_eta_keys_in_a1111_order():
    p = Params("x", sampler="Euler a", ensd=31337, rng="nv", eta_ancestral=0.67)
    assert infotext(p, "m", "h").endswith("Model: m, ENSD: 31337, RNG: NV, Eta: 0.67")
    assert "ENSD" not in infotext(p.replace(sampler="DPM++ 2M"), "m", "h")  # no per-step noise
    assert "ENSD" not in infotext(p.replace(sampler="DPM++ SDE"), "m", "h")  # a Brownian tree from the seed alone
    assert "ENSD: 31337" in infotext(p.replace(sampler="LCM"), "m", "h")
    assert "ENSD: 31337" in infotext(p.replace(sampler="DDIM", eta=0.5), "m", "h")
    assert "ENSD" not in infotext(p.replace(sampler="DDIM", eta=0.0), "m", "h")
    assert "ENSD" not in infotext(p.replace(eta_ancestral=0.0), "m", "h")  # eta 0: no noise after the start
    assert "Eta" not in infotext(p.replace(eta_ancestral=1.0), "m", "h")  # 1 is A1111's default
    assert "RNG" not in infotext(p.replace(rng="gpu"), "m", "h")


@pytest.mark.parametrize(
    "written, sampler, schedule",
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "Automatic"),  # Karras is its own default: A1111 reads Automatic too
        ("DPM++ 2M Exponential", "DPM++ 2M", "Exponential"),
        ("LMS Karras", "LMS", "Karras"),
        ("Euler a", "Euler a", "Automatic"),
        ("DPM++ SDE Karras", "DPM++ SDE", "Automatic"),
        ("DPM2 a Karras", "DPM2 a", "Automatic"),
        ("k_euler_a", "Euler a", "Automatic"),
        ("dpm++ 2m sde", "DPM++ 2M SDE", "Automatic"),
        ("Euler SGM Uniform", "Euler", "SGM Uniform"),
    ],
)
def test_old_combined_names_and_aliases_read(written, sampler, schedule):
    p = a1111(f"Steps: 20, Sampler: {written}, CFG scale: 7, Seed: 1, Size: 512x512")
    assert (p.sampler, p.schedule) == (sampler, schedule)


def test_schedule_type_key_and_a_combined_name():
    p = a1111("Steps: 20, Sampler: DPM++ 2M, Schedule type: Exponential, CFG scale: 7, Seed: 1")
    assert (p.sampler, p.schedule) == ("DPM++ 2M", "Exponential")
    p = a1111("Steps: 20, Sampler: Euler, Schedule type: karras, CFG scale: 7, Seed: 1")  # any case
    assert (p.sampler, p.schedule) == ("Euler", "Karras")
    p = a1111("Steps: 20, Sampler: LMS Karras, Schedule type: Exponential, CFG scale: 7, Seed: 1")
    assert (p.sampler, p.schedule) == ("LMS", "Karras")  # the combined name wins, as in A1111


def test_rng_missing_is_nv_and_written_ones_read():
    assert a1111("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1").rng == "nv"
    assert a1111("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, RNG: CPU").rng == "cpu"
    assert a1111("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, RNG: NV").rng == "nv"
    assert a1111("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, RNG: GPU").rng == "gpu"
    found = params_from_infotext(BASE + "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, RNG: Quantum")
    assert found.get("rng") is None and found.extra == {"RNG": "Quantum"}
    assert any("RNG Quantum" in n for n in notes(found))
    assert params_from_infotext("just a prompt").get("rng") is None  # no settings at all: nothing recorded


def test_eta_keys():
    p = a1111("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, ENSD: 31337, Eta: 0.5")
    assert (p.eta, p.eta_ancestral, p.ensd) == (0.0, 0.5, 31337)
    p = a1111("Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Eta DDIM: 0.3")
    assert (p.eta, p.eta_ancestral) == (0.3, 1.0)


def test_an_unknown_sampler_is_kept_as_text_and_noted():
    found = params_from_infotext(BASE + "Steps: 20, Sampler: DPM adaptive, CFG scale: 7, Seed: 1")
    assert (found.sampler, found.get("sampler"), found.params.sampler) == ("DPM adaptive", None, "DDIM")
    assert found.to_dict()["sampler"] == "DPM adaptive"
    assert any(n.startswith("sampler DPM adaptive: sdterm doesn't have it") for n in notes(found))
    assert "--sampler" not in generate_command(found)


def test_show_line_names_the_sampler_schedule_rng_eta_and_ensd():
    found = params_from_infotext(BASE + "Steps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7, "
                                        "Seed: 1, ENSD: 31337, Eta: 0.5")
    line = generate_command(found)
    assert line.endswith("--sampler 'DPM++ 2M SDE' --schedule Karras --rng nv --eta-ancestral 0.5 --ensd 31337")
    assert not any("sampler" in n or "schedule" in n or "RNG" in n or "ENSD" in n for n in notes(found))
    found = params_from_infotext(BASE + "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, ENSD: 31337, RNG: CPU")
    assert generate_command(found).endswith("--sampler 'Euler a' --ensd 31337")
    # and the line parses back to the same parameters
    parser = argparse.ArgumentParser()
    parser.add_argument("prompt")
    add_render_options(parser)
    import shlex

    args = parser.parse_args(shlex.split(generate_command(found))[2:])
    assert params_from_args(args).replace(prompt=found.params.prompt) == found.params


def test_a1111_ddim_is_noted_as_one_update_short():
    found = params_from_infotext(BASE + "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1")
    assert any("one update short" in n for n in notes(found))


# ---- the flags ----------------------------------------------------------------------------------------


def parse(*argv: str) -> Params:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_render_options(parser)
    return params_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--sampler", "Euler a"], {"sampler": "Euler a"}),
        (["--sampler", "euler A"], {"sampler": "Euler a"}),
        (["--sampler", "k_euler_a"], {"sampler": "Euler a"}),
        (["--sampler", "DPM++ 2M Karras"], {"sampler": "DPM++ 2M", "schedule": "Karras"}),
        (["--sampler", "lms karras"], {"sampler": "LMS", "schedule": "Karras"}),
        (["--sampler", "LMS Karras", "--schedule", "exponential"], {"sampler": "LMS", "schedule": "Exponential"}),
        (["--schedule", "Exponential", "--sampler", "LMS Karras"], {"sampler": "LMS", "schedule": "Exponential"}),
        (["--schedule", "sgm_uniform"], {"schedule": "SGM Uniform"}),
        (["--rng", "NV"], {"rng": "nv"}),
        (["--rng", "gpu"], {"rng": "gpu"}),
        (["--eta-ancestral", "0.5", "--ensd", "31337"], {"eta_ancestral": 0.5, "ensd": 31337}),
        ([], {}),
    ],
)
def test_flags(argv, expected):
    assert parse(*argv) == Params(**expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sampler", "Euler b"], "unknown sampler 'Euler b'; one of: DPM++ 2M, DPM++ SDE, "),
        (["--sampler", "DPM++ 2M Foo"], "unknown sampler"),
        (["--schedule", "Fast"], "unknown schedule 'Fast'; one of: Automatic, Uniform, Karras, "),
        (["--rng", "mps"], "unknown rng 'mps'; one of: cpu, nv, gpu"),
        (["--ensd", "x"], "expected a whole number"),
    ],
)
def test_flag_errors_are_one_line_with_the_names(argv, message):
    with pytest.raises(argparse.ArgumentError) as exc:
        parse(*argv)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_out_of_range_values_get_the_validators_line():
    from sdterm.errors import ConfigError

    with pytest.raises(ConfigError, match="eta"):
        parse("--eta-ancestral", "2").validated()


# ---- the slash commands and the parameter line ---------------------------------------------------------


def session(tmp_path) -> Session:
    return Session(Params(), History(tmp_path / "h.jsonl"), random.Random(0))


def test_sampler_command_sets_sampler_and_combined_schedule(tmp_path):
    s = session(tmp_path)
    assert s.apply(parse_command("/sampler dpm++ 2m karras")).message == "sampler DPM++ 2M Karras"
    assert (s.params.sampler, s.params.schedule) == ("DPM++ 2M", "Automatic")  # Karras is its default
    s.apply(parse_command("/sampler LMS Karras"))
    assert (s.params.sampler, s.params.schedule) == ("LMS", "Karras")
    s.apply(parse_command("/sampler k_euler"))  # a bare name keeps the schedule, as A1111's two menus do
    assert (s.params.sampler, s.params.schedule) == ("Euler", "Karras")
    assert s.apply(parse_command("/schedule automatic")).message == "schedule Automatic: sampler Euler"
    assert s.apply(parse_command("/sampler DDIM")).message == "sampler DDIM"
    assert "not used by DDIM" in s.apply(parse_command("/schedule Karras")).message
    assert s.apply(parse_command("/rng NV")).message == "rng nv" and s.params.rng == "nv"
    listed = s.apply(parse_command("/sampler")).message
    assert listed.startswith("sampler DDIM; /sampler NAME: DPM++ 2M, ") and "\n" not in listed
    assert "Align Your Steps" in s.apply(parse_command("/schedule")).message
    assert s.apply(parse_command("/rng")).message == "rng nv; /rng NAME: cpu, nv, gpu"


@pytest.mark.parametrize(
    "line, message",
    [
        ("/sampler Euler b", "unknown sampler 'Euler b'; one of: DPM++ 2M, "),
        ("/schedule Fast", "unknown schedule 'Fast'; one of: Automatic, "),
        ("/rng mps", "unknown rng 'mps'; one of: cpu, nv, gpu"),
    ],
)
def test_bad_names_change_nothing(tmp_path, line, message):
    s = session(tmp_path)
    with pytest.raises(CommandError) as exc:
        s.apply(parse_command(line))
    assert str(exc.value).startswith(message) and s.params == Params()


@pytest.mark.parametrize(
    "typed, completed",
    [
        ("/sa", "/sampler "), ("/sc", "/schedule "), ("/rn", "/rng "),
        ("/sampler eu", "/sampler Euler"), ("/sampler Euler ", "/sampler Euler a"),
        ("/sampler DPM++ 2M K", "/sampler DPM++ 2M Karras"), ("/sampler dpm++ 2m s", "/sampler DPM++ 2M SDE"),
        ("/sampler LMS E", "/sampler LMS Exponential"), ("/schedule ka", "/schedule Karras"),
        ("/schedule SGM", "/schedule SGM Uniform"), ("/rng n", "/rng nv"), ("/sampler zz", None),
    ],
)
def test_completion_of_names(typed, completed):
    assert complete(typed) == completed


def test_the_parameter_line_names_the_sampler(tmp_path):
    s = session(tmp_path)
    assert s.describe() == "seed random · 50 steps · CFG 7.5 · 512×512 · eta 0 · budget auto"  # DDIM: as before
    s.set(sampler="DPM++ 2M", steps=20)
    assert s.describe() == "seed random · DPM++ 2M Karras · 20 steps · CFG 7.5 · 512×512 · budget auto"
    s.set(sampler="Euler a", eta_ancestral=0.5, rng="nv", ensd=31337)
    assert s.describe() == "seed random · Euler a · 20 steps · CFG 7.5 · 512×512 · eta 0.5 · rng nv · ENSD 31337 · budget auto"
    s.set(sampler="LMS", schedule="Exponential", rng="cpu", ensd=0)
    assert s.describe() == "seed random · LMS Exponential · 20 steps · CFG 7.5 · 512×512 · budget auto"


def test_sampler_label():
    assert sampler_label(Params(sampler="DPM++ 2M")) == "DPM++ 2M Karras"
    assert sampler_label(Params(sampler="UniPC", schedule="Karras")) == "UniPC"  # brings its own timesteps
    assert sampler_label(Params(sampler="Euler", schedule="Uniform")) == "Euler"


def test_the_history_and_notice_summary_names_a_sampler_other_than_ddim():
    from sdterm.ui.screens import summary

    assert summary(Params(seed=1, steps=4, cfg=5, width=80, height=64)) == "seed 1 · 4 steps · CFG 5 · 80×64"
    assert summary(Params(seed=1, steps=20, sampler="DPM++ 2M")) == "seed 1 · DPM++ 2M Karras · 20 steps · CFG 7.5 · 512×512"

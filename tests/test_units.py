"""Units: byte sizes read and written, WIDTHxHEIGHT, the VRAM budget's floor."""

from __future__ import annotations

import pytest

from sdterm.errors import ConfigError
from sdterm.units import MIN_BUDGET, GiB, MiB, format_bytes, parse_budget, parse_size, parse_wh


@pytest.mark.parametrize(
    "text, value",
    [("256M", 256 * MiB), ("1.5G", 3 * GiB // 2), ("512MiB", 512 * MiB), ("1000000", 1_000_000), ("2gb", 2 * GiB),
     (" 1 K ", 1024), (7, 7)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "", "1T", "-1G", "1.2.3M"])
def test_parse_size_rejects_with_the_name(text):
    with pytest.raises(ConfigError, match="--what"):
        parse_size(text, "--what")


def test_format_bytes_styles():
    n = 3 * GiB // 2
    assert (format_bytes(n), format_bytes(n, "short"), format_bytes(n, "size")) == ("1.50 GiB", "1.50G", "1.5G")
    assert (format_bytes(900 * MiB), format_bytes(900 * MiB, "short"), format_bytes(900 * MiB, "size")) == (
        "900 MiB", "900M", "900M")
    assert (format_bytes(2048), format_bytes(2048, "size"), format_bytes(100, "size")) == ("2 KiB", "2K", "100B")
    assert (format_bytes(None), format_bytes(None, "short")) == ("-", "–")
    for n in (MIN_BUDGET, 3 * GiB // 2, 1536 * MiB, 2 * GiB, 12 * 1024):
        assert parse_size(format_bytes(n, "size")) == n  # the size style reads back


@pytest.mark.parametrize("text, wh", [("512x768", (512, 768)), (" 64 X 48 ", (64, 48)), ("8×16", (8, 16)),
                                      ("8*8", (8, 8)), ("５１２x５１２", (512, 512))])
def test_parse_wh(text, wh):
    assert parse_wh(text) == wh


@pytest.mark.parametrize("text", ["512", "512x", "x512", "axb", "512x512x512", "1" * 5000 + "x8", ""])
def test_parse_wh_rejects_in_one_line(text):
    with pytest.raises(ConfigError) as info:
        parse_wh(text, "--sizes")
    assert str(info.value).startswith("--sizes must be WIDTHxHEIGHT") and len(str(info.value)) < 120


def test_parse_budget():
    assert [parse_budget(t) for t in (None, "", "auto", "None")] == [None] * 4
    assert parse_budget("1G") == GiB and parse_budget("256M") == MIN_BUDGET
    with pytest.raises(ConfigError, match="--vram-budget must be at least 256M, got 100M"):
        parse_budget("100M", "--vram-budget")

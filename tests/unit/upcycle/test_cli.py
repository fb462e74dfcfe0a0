"""What a user of ``megatron-dpsl-upcycle`` reads: ``--help`` and the closing summary."""

from __future__ import annotations

import argparse
import re

import pytest
from support.upcycle import write_tiny_hf_llama

from megatron_dpsl.upcycle.cli import build_parser, main
from megatron_dpsl.upcycle.summary import format_bytes


def _help_blocks(text: str) -> dict[str, str]:
    """``--help`` output -> {first option string: its help text, lines joined}."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.split("\n"):
        match = re.match(r"  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            head, _, rest = line.strip().partition(
                "  "
            )  # option column, then the help on the same line
            blocks[current] = rest.strip()
        elif current and line.startswith("    "):
            blocks[current] = f"{blocks[current]} {line.strip()}".strip()
        else:
            current = None
    return blocks


def test_help_shows_a_text_and_the_default_of_every_flag(monkeypatch, capsys):
    # the console entry point's output, as a user sees it (wide terminal: no wrapping inside values)
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    blocks = _help_blocks(capsys.readouterr().out)
    actions = [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert set(blocks) == {"-h"} | {a.option_strings[0] for a in actions}
    for action in actions:
        help_text = blocks[action.option_strings[0]]
        words = help_text.split("(default")[0].split("(required")[0]
        assert len(words.split()) >= 3, f"{action.option_strings[0]}: no help text: {help_text!r}"
        assert help_text.count("default") <= 1, (
            f"{action.option_strings[0]}: default shown twice: {help_text!r}"
        )
        if action.required:
            assert help_text.endswith("(required)"), help_text
        elif isinstance(action, argparse._StoreTrueAction):
            assert help_text.endswith("(default: off)"), help_text
        elif action.default is not None:
            assert help_text.endswith(f"(default: {action.default})"), help_text
        else:  # computed defaults say what they are in words
            assert re.search(r"\((default: [^)]+|required unless --dry-run)\)$", help_text), (
                help_text
            )


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (20 * 1024 + 100, "20.1 KiB"),
        (412 * 2**20 + 2**19, "412.5 MiB"),
        (2**30 - 1, "1024.0 MiB"),
        (int(3.8 * 2**30), "3.80 GiB"),
    ],
)
def test_sizes_below_a_gib_are_not_zero_gib(n, text):
    assert format_bytes(n) == text


def test_summary_of_a_small_conversion_prints_kib_not_zero_gib(tmp_path, capsys):
    src = write_tiny_hf_llama(tmp_path / "hf")
    assert (
        main(
            [
                "--source",
                str(src),
                "--output",
                str(tmp_path / "moe"),
                "--num-experts",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    written = re.search(r"written\s+\| (.*)", out).group(1)
    size = sum(f.stat().st_size for f in (tmp_path / "moe" / "release").iterdir())
    assert written == format_bytes(size) and written.endswith("KiB") and "0.00 GiB" not in out

"""Each bench's --help quotes the defaults a run really gets: the values
come from the bench's presets (benchlib.apply_presets), not from the
argparse defaults, so the two could drift apart (they did: bench/tproxy.py's
help said 7 rounds while a run made 5)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

BENCHES = ("clusterip", "nodeport", "observe", "tproxy", "compare")
# option -> the parsed argument it sets
QUOTED = {"--rounds": "rounds", "--duration": "duration",
          "--quiet-timeout": "quiet_timeout", "--quiet-budget": "quiet_budget"}
COMPARE_ONLY = {"--loads": "loads", "--latency-seconds": "latency_seconds",
                "--cp-rounds": "cp_rounds", "--one-more": "one_more"}


def _help(module: object, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])  # type: ignore[attr-defined]
    return " ".join(capsys.readouterr().out.split())


def _quoted(help_text: str, option: str, quick: bool) -> str:
    """The default the help gives for `option` (its --quick one if asked)."""
    # Up to the next option (a help may mention --quick itself).
    entry = re.search(rf"{re.escape(option)} [A-Z_]+ (.*?)(?= --(?!quick\b)[a-z]|$)", help_text)
    assert entry, f"{option} is not in the help"
    pattern = r"--quick:? ([0-9.,]+)" if quick else r"default ([0-9.,]+)"
    found = re.search(pattern, entry.group(1))
    assert found, f"{option}'s help quotes no {'--quick value' if quick else 'default'}"
    return found.group(1).rstrip(".,;")


def _same(quoted: str, value: object) -> bool:
    if isinstance(value, str):
        return quoted == value
    return float(quoted) == float(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", BENCHES)
def test_the_help_quotes_the_defaults_of_a_full_run(
        name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(name)
    help_text = _help(module, capsys)
    args = module.parse_args([])
    options = {**QUOTED, **(COMPARE_ONLY if name == "compare" else {})}
    for option, key in options.items():
        quoted = _quoted(help_text, option, quick=False)
        assert _same(quoted, getattr(args, key)), (option, quoted, getattr(args, key))


def test_the_compare_help_quotes_the_quick_values(capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module("compare")
    help_text = _help(module, capsys)
    args = module.parse_args(["--quick"])
    for option, key in {**COMPARE_ONLY, "--quiet-timeout": "quiet_timeout"}.items():
        quoted = _quoted(help_text, option, quick=True)
        assert _same(quoted, getattr(args, key)), (option, quoted, getattr(args, key))

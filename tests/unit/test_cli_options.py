"""The `veer` command's numeric options: a value out of range is argparse's
usage error (exit code 2, the option named), never a traceback from the
protobuf request, a thread's wait or the kernel, and never a request sent.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from agent.cli import commands
from agent.cli.main import build_parser, main
from agent.errors import ConfigError

EXPLAIN = ["explain", "--dst", "10.96.0.10"]

REFUSED = [
    (["conntrack", "--port", "-5"], "--port"),
    (["conntrack", "--port", "65536"], "--port"),
    ([*EXPLAIN, "--port", "-1"], "--port"),
    ([*EXPLAIN, "--port", "0"], "--port"),  # 0 means "any" to conntrack only
    ([*EXPLAIN, "--port", "5000000000"], "--port"),
    ([*EXPLAIN, "--port", "80", "--from-pid", "0"], "--from-pid"),
    (["observe", "--last", "-1"], "--last"),
    (["observe", "--last", str(2**32)], "--last"),  # the request's field is a uint32
    (["resync", "--timeout", "nan"], "--timeout"),
    (["resync", "--timeout", "inf"], "--timeout"),
    (["resync", "--timeout", "-1"], "--timeout"),
    (["resync", "--timeout", "0"], "--timeout"),
    (["resync", "--timeout", "1e12"], "--timeout"),  # would overflow the agent's wait
    (["agent", "--min-sync-interval", "-1"], "--min-sync-interval"),
    (["agent", "--min-sync-interval", "nan"], "--min-sync-interval"),
    (["agent", "--max-sync-interval", "nan"], "--max-sync-interval"),
    (["agent", "--max-sync-interval", "inf"], "--max-sync-interval"),
    (["agent", "--max-sync-interval", "0"], "--max-sync-interval"),
    (["agent", "--proxy-uid", "-1"], "--proxy-uid"),
    (["agent", "--proxy-uid", str(2**32 - 1)], "--proxy-uid"),  # (uid_t)-1: no uid
    (["sandbox", "--requests", "0"], "--requests"),
]


@pytest.mark.parametrize(("argv", "option"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_out_of_range_is_a_usage_error(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as end:
        build_parser().parse_args(argv)
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: veer ") and f"error: argument {option}: " in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["conntrack", "--port", "-5"],
                                  [*EXPLAIN, "--port", "5000000000"],
                                  ["observe", "--last", "-1"],
                                  ["resync", "--timeout", "nan"]])
def test_debug_commands_stop_before_asking_the_agent(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through main(), as a user runs them: no agent answers at this socket, so
    a command that got past its options would end with exit code 3 (or, before
    the options were checked, a ValueError from building the request)."""
    with pytest.raises(SystemExit) as end:
        main([*argv, "--socket", str(tmp_path / "none.sock")])
    assert end.value.code == 2
    assert "no veer agent" not in capsys.readouterr().err


ACCEPTED = [
    (["conntrack", "--port", "0"], "port", 0),
    (["conntrack", "--port", "65535"], "port", 65535),
    ([*EXPLAIN, "--port", "1"], "port", 1),
    (["observe", "--last", "0"], "last", 0),
    (["resync", "--timeout", "0.5"], "timeout", 0.5),
    (["agent", "--min-sync-interval", "0"], "min_sync_interval", 0.0),
    (["agent", "--max-sync-interval", "86400"], "max_sync_interval", 86400.0),
    (["agent", "--proxy-uid", "0"], "proxy_uid", 0),
    (["sandbox", "--nodes", "8"], "nodes", 8),
]


@pytest.mark.parametrize(("argv", "dest", "value"), ACCEPTED,
                         ids=[" ".join(a) for a, _, _ in ACCEPTED])
def test_the_ends_of_each_range_are_accepted(argv: list[str], dest: str, value: object) -> None:
    """The checks are not stricter than the options mean: 0 is "any port" to
    conntrack, "all kept" to --last, "no pacing" to --min-sync-interval."""
    assert getattr(build_parser().parse_args(argv), dest) == value


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_no_numeric_option_takes_any_number() -> None:
    """A bare int or float type lets -1, NaN and 1e999 through; every numeric
    option of the agent, the sandbox and the debug commands says its range.
    (`veer operator`'s options are agent/operator/main.py's, not checked here.)"""
    bare = [f"veer {name} {'/'.join(action.option_strings)}"
            for name, sub in _subcommands(build_parser()).items() if name != "operator"
            for action in sub._actions if action.type in (int, float)]
    assert bare == []


def test_a_missing_nsenter_is_an_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_nsenter(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", "nsenter")

    monkeypatch.setattr(commands.subprocess, "run", no_nsenter)
    with pytest.raises(ConfigError, match="cannot enter the network namespace /proc/1/ns/net"):
        commands.netns_cookie(1, None)

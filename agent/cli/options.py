"""argparse types for veer's numeric options.

A value out of range is a usage error (argparse's usage line, its message and
exit code 2), checked where it is typed: otherwise it travels on and fails
far away, as a traceback from a protobuf field it does not fit, a thread's
wait that overflows, or a NaN that makes every comparison false.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

PORT_MAX = 65535
UINT32_MAX = 2**32 - 1  # the API's uint32 fields (ObserveRequest.last)
# uid_t is 32 bits and (uid_t)-1 is "no uid" to the kernel, never a user's.
UID_MAX = UINT32_MAX - 1
# The longest wait an option may ask for. A day is past any wait a user
# means, and far inside what threading's waits accept (threading.TIMEOUT_MAX,
# beyond which they raise OverflowError in the thread that waits).
SECONDS_MAX = 86400.0


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number in low..high (no upper bound when high is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            wanted = f"{low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({wanted})")
        return value

    return parse


def seconds(zero: bool = False, high: float = SECONDS_MAX) -> Callable[[str], float]:
    """A finite number of seconds, positive (or 0 too if `zero`), at most `high`."""

    def parse(text: str) -> float:
        wanted = f"expected a number of seconds {'from 0' if zero else 'above 0'} up to {high:g}"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}") from None
        # NaN fails every comparison, so it is ruled out by name, as are the
        # infinities (float() accepts "nan", "inf" and "1e999").
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > high:
            raise argparse.ArgumentTypeError(f"{wanted}, got {text!r}")
        return value

    return parse


PORT = integer(1, PORT_MAX)
PORT_OR_ANY = integer(0, PORT_MAX)  # 0: any port

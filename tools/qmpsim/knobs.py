"""The simulated guest and link, from the environment, and time scaled by a speed factor.

Every duration the model computes is in simulated seconds; `Clock` turns them into the real
delays the event loop waits, so a fleet migrates `speed` times faster than real time.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

__all__ = ["Clock", "Knobs", "KnobsError", "load"]

GIB = 1 << 30


class KnobsError(Exception):
    """The environment names knobs that cannot be used (a bad number, an unreadable file)."""


@dataclass(frozen=True)
class Knobs:
    speed: float = 1.0
    # Bytes per simulated second the running guest dirties (distinct pages, capped by RAM).
    dirty_rate: float = 0.0
    # Bytes per simulated second the link carries, whatever max-bandwidth allows.
    link: float = float(GIB)


@dataclass(frozen=True)
class Clock:
    """Simulated time: `speed` simulated seconds pass per real second."""

    speed: float

    def now(self) -> float:
        """Simulated seconds on a monotonic scale."""
        return time.monotonic() * self.speed

    def real_delay(self, simulated: float) -> float:
        return max(0.0, simulated / self.speed)


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise KnobsError(f"{name}={text!r} is not a number") from None
    if not value >= 0:  # NaN too
        raise KnobsError(f"{name}={text!r} must be a number >= 0")
    return value


def load(vm: str, environ: dict[str, str] | None = None) -> Knobs:
    """The knobs of VM `vm`: the environment variables, then its entry in the knobs file."""
    env = os.environ if environ is None else environ
    values: dict[str, float] = {}
    for key, name in (("speed", "SPEED"), ("dirty_rate", "DIRTY_RATE"), ("link", "LINK")):
        text = env.get(f"WHIMBREL_QMPSIM_{name}")
        if text:
            values[key] = _number(f"WHIMBREL_QMPSIM_{name}", text)
    path = env.get("WHIMBREL_QMPSIM_KNOBS")
    if path:
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError) as err:
            raise KnobsError(f"WHIMBREL_QMPSIM_KNOBS={path}: {err}") from None
        if not isinstance(table, dict):
            raise KnobsError(f"WHIMBREL_QMPSIM_KNOBS={path}: not a JSON object")
        for entry in (table.get("*"), table.get(vm)):
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise KnobsError(f"WHIMBREL_QMPSIM_KNOBS={path}: entry is not an object")
            for key, value in entry.items():
                if key not in ("speed", "dirty_rate", "link"):
                    raise KnobsError(f"WHIMBREL_QMPSIM_KNOBS={path}: unknown knob {key!r}")
                values[key] = _number(f"{path}: {key}", str(value))
    if values.get("speed", 1.0) <= 0 or values.get("link", 1.0) <= 0:
        raise KnobsError("the speed and the link bandwidth must be above 0")
    return Knobs(**values)

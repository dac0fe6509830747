"""Checks of user-given numbers, each raising a ``ValueError`` that names the argument and what it expects.

One home for the checks every entry point needs (sizes, rates, scales), so that messages read alike
and a fix to one (e.g. refusing ``True`` as ``1``) reaches all of them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["positive_int", "non_negative_int", "int_at_least", "positive", "non_negative", "fraction", "guidance_scale"]


def _fail(name: str, rule: str, what: str | None, value: Any) -> ValueError:
    return ValueError(f"{name} must {rule}{f' ({what})' if what else ''}, got {value!r}")


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True as "1 step" is nearly always a slip
    if isinstance(value, bool):
        return False
    try:
        return int(value) == value
    except (TypeError, ValueError, OverflowError):
        return False


def positive_int(value: Any, name: str, what: str | None = None) -> int:
    """``value`` as an ``int >= 1``; else a ``ValueError`` naming ``name`` (and ``what`` it counts)."""
    if not _is_int(value) or value < 1:
        raise _fail(name, "be a positive integer", what, value)
    return int(value)


def int_at_least(value: Any, minimum: int, name: str, what: str | None = None) -> int:
    """``value`` as an ``int >= minimum``."""
    if not _is_int(value) or value < minimum:
        raise _fail(name, f"be an integer >= {minimum}", what, value)
    return int(value)


def non_negative_int(value: Any, name: str, what: str | None = None) -> int:
    """``value`` as an ``int >= 0``."""
    return int_at_least(value, 0, name, what)


def _finite(value: Any, name: str, what: str | None, rule: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(name, rule, what, value) from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise _fail(name, rule, what, value)
    return number


def positive(value: Any, name: str, what: str | None = None) -> float:
    """``value`` as a finite ``float > 0``."""
    number = _finite(value, name, what, "be a finite number > 0")
    if number <= 0:
        raise _fail(name, "be a finite number > 0", what, value)
    return number


def non_negative(value: Any, name: str, what: str | None = None) -> float:
    """``value`` as a finite ``float >= 0``."""
    number = _finite(value, name, what, "be a finite number >= 0")
    if number < 0:
        raise _fail(name, "be a finite number >= 0", what, value)
    return number


def fraction(value: Any, name: str, what: str | None = None, *, closed: bool = False) -> float:
    """``value`` in ``[0, 1)`` (``closed=True``: ``[0, 1]``)."""
    rule = "lie in [0, 1]" if closed else "lie in [0, 1)"
    number = _finite(value, name, what, rule)
    if number < 0 or number > 1 or (number == 1 and not closed):
        raise _fail(name, rule, what, value)
    return number


def guidance_scale(value: Any, name: str = "the guidance scale") -> float:
    """A guidance weight: finite and ``>= 0`` (0 = no guidance, 1 = the exact conditional)."""
    return non_negative(value, name, "0 = no guidance, 1 = the exact conditional")

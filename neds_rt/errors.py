"""One place that makes neds-rt's errors.

Every error names what is wrong (the argument, dataset or message), the rule it broke, the bad value, and
what to do about it. Call :func:`invalid` rather than building messages by hand.
"""

from __future__ import annotations

from typing import TypeVar


class NedsRtError(Exception):
    """Base class of every error neds-rt raises on purpose."""


class DataError(NedsRtError, ValueError):
    """Bad or missing data: a ONE cache, a session, a dataset, a table."""


class StreamError(NedsRtError, ValueError):
    """A malformed or mismatched live stream or stream message."""


class ModelFileError(NedsRtError, ValueError):
    """A model file or checkpoint that is corrupt, incomplete or does not fit."""


class ConfigError(NedsRtError, ValueError):
    """A configuration or command-line value that breaks a rule."""


E = TypeVar("E", bound=NedsRtError)


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid(
    what: str,
    rule: str,
    value: object = None,
    fix: str = "",
    kind: type[E] = ConfigError,  # type: ignore[assignment]
) -> E:
    """Build (not raise) an error: ``raise invalid("grace", "must be >= 0 ms", -3, "pass --grace 5")``.

    ``what`` names the argument / dataset / message, ``rule`` the rule it broke, ``value`` the bad value
    (omitted from the message when ``None``) and ``fix`` what the user should do.
    """
    msg = f"{what}: {rule}"
    if value is not None:
        msg += f" (got {_short(value)})"
    if fix:
        msg += f". {fix[0].upper()}{fix[1:]}"
    if not msg.endswith("."):
        msg += "."
    return kind(msg)

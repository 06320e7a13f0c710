"""The exceptions that reach the user as one-line messages.

Library code (constructors, loaders) raises ``InvalidArgument`` naming *its own* parameter
(``resample``); ``build`` maps that parameter to the config key it came from
(``task.resample``) and raises ``UserError``, so every message names a key that exists.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """Bad input: the message names the key, the value given and what is allowed.

    The CLI prints it as one line and exits with status 2, without a traceback (set
    ``MAML_RUNNER_TRACEBACK=1`` to see one).
    """


class InvalidArgument(ValueError):
    """A constructor or loader was given a value it cannot use.

    Args:
        name: the parameter's name as the callee spells it (``n_way``, ``resample``).
        value: the value given.
        allowed: what is allowed, or what to do, for a person (``choose one of a, b``).
    """

    def __init__(self, name: str, value: object, allowed: str) -> None:
        super().__init__(f"{name}={value}: {allowed}")
        self.name, self.value, self.allowed = name, value, allowed


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``InvalidArgument(name, value, allowed)`` unless ``ok``."""
    if not ok:
        raise InvalidArgument(name, value, allowed)


def choose(name: str, value: object, choices: Iterable[object]) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (listed in the message)."""
    choices = list(choices)
    require(value in choices, name, value, f"choose one of {', '.join(map(str, choices))}")


def is_number(value: object) -> bool:
    """An int or float, not a bool (YAML's ``true`` is not a number to compare)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: object, minimum: int = 1) -> None:
    """Refuse anything but an integer (not a bool) >= ``minimum``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    require(ok, name, value, f"must be an integer >= {minimum}")

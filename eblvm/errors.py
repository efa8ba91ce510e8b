"""Errors that end a run with a message a user can act on."""

from __future__ import annotations

from typing import Any

# Top-level config keys that a component may name in its errors about another group's value.
GROUPS_NAMED_FROM_ELSEWHERE = ("data",)


class ConfigError(ValueError):
    """A configuration value that cannot work, raised before any training starts.

    ``key`` is the dotted config key as a user would override it (``objective.sigma``), so the message can be
    pasted back as a fix. Components raise it with their argument name; ``with_prefix`` adds the config group.
    """

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def with_prefix(self, prefix: str) -> ConfigError:
        """The same error under the config group ``prefix``; a key that names another group (``data.…``, raised
        by a model about the data it was given) is already complete and is kept."""
        if self.key.split(".", 1)[0] in GROUPS_NAMED_FROM_ELSEWHERE:
            return self
        return ConfigError(f"{prefix}.{self.key}", self.value, self.allowed)


class DivergenceError(RuntimeError):
    """A loss or gradient became NaN or infinite; the run stops and keeps its last finite checkpoint."""

    def __init__(self, step: int, quantity: str, value: float):
        self.step, self.quantity, self.value = step, quantity, value
        super().__init__(f"training diverged at step {step}: {quantity} is {value}")


class Preempted(RuntimeError):
    """A signal (SIGTERM, SIGUSR1) stopped the run at a step boundary after its checkpoint was written."""

    def __init__(self, step: int, signal_name: str):
        self.step, self.signal_name = step, signal_name
        super().__init__(f"{signal_name} received: stopped at step {step} with checkpoints/last.ckpt written")


def require(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError(key, value, allowed)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, value, allowed)


def require_count(key: str, value: Any, minimum: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    require(is_integer and value >= minimum, key, value, f"must be an integer >= {minimum}")


def require_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    require(value in choices, key, value, f"must be one of {', '.join(choices)}")

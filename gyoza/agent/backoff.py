"""Exponential backoff with jitter between reconnect attempts."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double after each failure, capped, with jitter, reset on success.

    The n-th delay after a success is drawn uniformly from
    ``[(1 - jitter) * d, d]`` where ``d = min(maximum, initial * multiplier ** n)``. The
    jitter spreads a fleet's reconnects after a server restart, so that hundreds of agents
    do not knock at the same instant; the floor keeps one agent from spinning.

    Parameters
    ----------
    initial : float
        First delay in seconds (before jitter).
    maximum : float
        Cap of the delay in seconds.
    multiplier : float
        Growth factor per failure (at least 1).
    jitter : float
        Fraction of the delay that is random, in ``[0, 1]``.
    rng : random.Random | None
        Source of randomness (tests pass a seeded one).
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 30.0,
        *,
        multiplier: float = 2.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if multiplier < 1:
            raise ValueError("backoff multiplier must be >= 1")
        if not 0 <= jitter <= 1:
            raise ValueError("backoff jitter must be within [0, 1]")
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def failures(self) -> int:
        """Failures since the last :meth:`reset`."""
        return self._failures

    def ceiling(self) -> float:
        """The next delay before jitter."""
        try:
            delay = self.initial * self.multiplier**self._failures
        except OverflowError:
            return self.maximum
        return min(delay, self.maximum)

    def next_delay(self) -> float:
        """Count one failure and return how long to wait before the next try."""
        ceiling = self.ceiling()
        self._failures += 1
        return self._rng.uniform((1.0 - self.jitter) * ceiling, ceiling)

    def reset(self) -> None:
        """Forget the failures (after a successful connection)."""
        self._failures = 0

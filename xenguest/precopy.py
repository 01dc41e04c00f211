"""When pre-copy stops: the one policy that xenguest and emu-manager both apply.

xenguest stops iterating and emu-manager moves to `suspend:` on the same
decision, taken from the same progress figures; two separately tuned copies
would leave one waiting for the other for ever. Tuned (for tests and
experiments) through the environment, which both inherit from the toolstack.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MAX_ITERATIONS = 5
DEFAULT_DIRTY_THRESHOLD = 50


@dataclass(frozen=True)
class Policy:
    """Fewer than `dirty_threshold` dirty pages after an iteration, or `max_iterations` done."""
    max_iterations: int = DEFAULT_MAX_ITERATIONS
    dirty_threshold: int = DEFAULT_DIRTY_THRESHOLD

    @classmethod
    def from_env(cls) -> "Policy":
        return cls(int(os.environ.get("XENGUEST_MAX_ITERATIONS", DEFAULT_MAX_ITERATIONS)),
                   int(os.environ.get("XENGUEST_DIRTY_THRESHOLD", DEFAULT_DIRTY_THRESHOLD)))

    def live_done(self, iteration: int, remaining: int) -> bool:
        """`remaining` is -1 while unknown (before the first count)."""
        return (iteration > 0 and 0 <= remaining < self.dirty_threshold) or iteration >= self.max_iterations - 1

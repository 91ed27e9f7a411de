"""Strategy ``none``: no teachers, the student trains with cross-entropy only."""

from __future__ import annotations

from . import WeightStrategy, register_strategy


@register_strategy("none")
class NoDistillation(WeightStrategy):
    requires = frozenset()
    options = ()

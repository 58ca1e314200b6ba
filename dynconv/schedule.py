"""Temperature control for every router in a model (DyConv's 30 -> 1 anneal)."""

from __future__ import annotations

from torch import nn

from .routing import Router
from .validation import check_temperature


def set_temperature(module: nn.Module, temperature: float) -> int:
    """Set the temperature of every router inside ``module`` (each :class:`dynconv.RoutingMLP`
    and each ODConv2d's :class:`dynconv.modules.ODConvRouter`: every ``dynconv.routing.Router``);
    returns how many were set."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    value = check_temperature(temperature)
    routers = [m for m in module.modules() if isinstance(m, Router)]
    for router in routers:
        router.temperature = value
    return len(routers)


class TemperatureSchedule:
    """Linear anneal from ``start`` to ``end`` over ``steps`` calls of :meth:`step`, then hold.

    After t calls of ``step`` the temperature is ``start + (end - start) * min(t / steps, 1)``.
    Call ``sched.apply(model)`` once before training to set the start value.
    """

    def __init__(self, start: float = 30.0, end: float = 1.0, steps: int = 1):
        self.start = check_temperature(start, "start")
        self.end = check_temperature(end, "end")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.steps = steps
        self.step_count = 0

    @property
    def temperature(self) -> float:
        progress = min(self.step_count / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress

    def apply(self, model: nn.Module) -> float:
        """Set the current temperature on every router of ``model`` and return it."""
        set_temperature(model, self.temperature)
        return self.temperature

    def step(self, model: nn.Module | None = None) -> float:
        """Advance one step; if ``model`` is given, set its routers' temperature. Returns it."""
        self.step_count += 1
        if model is not None:
            return self.apply(model)
        return self.temperature

    def state_dict(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "steps": self.steps,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (start, end, steps and step_count)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        expected = ("start", "end", "steps", "step_count")
        missing = [key for key in expected if key not in state]
        if missing:
            raise ValueError(
                f"state is missing {missing}: a TemperatureSchedule state_dict has keys "
                f"{list(expected)}, got {sorted(state)}"
            )
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise ValueError(f"state['step_count'] must be an int >= 0, got {step_count!r}")
        self.__init__(state["start"], state["end"], state["steps"])
        self.step_count = step_count

    def __repr__(self) -> str:
        return (
            f"TemperatureSchedule(start={self.start:g}, end={self.end:g}, steps={self.steps}, "
            f"step_count={self.step_count})"
        )

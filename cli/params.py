"""Option types the CLI needs beyond click's own."""

from __future__ import annotations

import math

import click


class Seconds(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A finite number of seconds, at least `minimum` (> it when `open_min`).

    click's FLOAT (and FloatRange, whose comparisons NaN passes) accepts `nan` and
    `inf`: a wait that never ends, or a request body the API cannot parse as JSON.
    """

    name = "seconds"

    def __init__(self, minimum: float = 0.0, open_min: bool = False) -> None:
        self.minimum = minimum
        self.open_min = open_min

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float) and math.isfinite(value):
            seconds = value
        else:
            try:
                seconds = float(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if seconds < self.minimum or (self.open_min and seconds == self.minimum):
            bound = "more than" if self.open_min else "at least"
            self.fail(f"{value!r}: give {bound} {self.minimum:g} seconds", param, ctx)
        return seconds


WAIT = Seconds(0.0)
RUN = Seconds(0.0, open_min=True)

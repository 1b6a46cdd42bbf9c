"""When the agent's next pass may start (`agent.runtime.pass_wait`): spaced while chains
run, at once for a new desired state or on a host with no chain running."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.runtime import PASS_GAP_S, pass_wait


@pytest.mark.parametrize(
    ("chains_run", "desired_changed", "ended", "now", "wait"),
    [
        (False, False, 10.0, 10.0, 0.0),  # nothing running: at once
        (True, False, 10.0, 10.0, PASS_GAP_S),  # chains run: a full gap after the last
        (True, False, 10.0, 10.25, PASS_GAP_S - 0.25),
        (True, False, 10.0, 10.0 + PASS_GAP_S, 0.0),
        (True, False, 10.0, 30.0, 0.0),  # the last pass was long ago
        (True, True, 10.0, 10.0, 0.0),  # a new desired state: planned at once
        (False, True, 10.0, 10.0, 0.0),
    ],
)
def test_pass_wait(
    chains_run: bool, desired_changed: bool, ended: float, now: float, wait: float
) -> None:
    assert pass_wait(chains_run, desired_changed, ended, now) == pytest.approx(wait)


def test_passes_are_spaced_by_a_second_while_chains_run() -> None:
    # Four asks a second (the spacing before) would observe a busy host four times as often.
    assert PASS_GAP_S >= 1.0


@given(
    st.booleans(),
    st.booleans(),
    st.floats(0, 1e6, allow_nan=False),
    st.floats(0, 100, allow_nan=False),
)
def test_never_negative_never_longer_than_the_gap(
    chains_run: bool, desired_changed: bool, ended: float, since: float
) -> None:
    now = ended + since  # monotonic: the last pass ended before now
    wait = pass_wait(chains_run, desired_changed, ended, now)
    assert 0.0 <= wait <= PASS_GAP_S
    if wait > 0:
        assert chains_run and not desired_changed and now < ended + PASS_GAP_S

"""The project write budget (controller/write_budget.py): a token bucket, pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from controller.api import error_response
from controller.errors import TooManyWrites
from controller.write_budget import WriteBudget


def test_a_burst_then_the_rate() -> None:
    budget = WriteBudget(per_s=2.0, burst=3)
    assert [budget.take("p", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert budget.take("p", 0.0) == 0.5  # one write back after half a second
    assert budget.take("q", 0.0) == 0.0  # another project's budget is its own
    assert budget.take("p", 0.5) == 0.0
    assert budget.take("p", 0.5) > 0
    assert [budget.take("p", 100.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # never past burst
    assert budget.take("p", 100.0) > 0


def test_no_budget() -> None:
    budget = WriteBudget(per_s=0.0, burst=1)
    assert all(budget.take("p", 0.0) == 0.0 for _ in range(1000))


@given(
    per_s=st.floats(0.1, 100.0),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
)
def test_writes_allowed_never_exceed_burst_plus_rate_times_time(
    per_s: float, burst: int, gaps: list[float]
) -> None:
    budget, now, allowed = WriteBudget(per_s, burst), 0.0, 0
    for gap in gaps:
        now += gap
        wait = budget.take("p", now)
        assert wait >= 0.0
        if wait == 0.0:
            allowed += 1
        else:
            assert wait <= 1.0 / per_s + 1e-9
    assert allowed <= burst + per_s * now + 1e-6


def test_a_refusal_says_when_to_retry() -> None:
    response = error_response(TooManyWrites("slow down", retry_after_s=0.2))
    assert response.status == 429 and response.headers["Retry-After"] == "1"


@given(
    per_s=st.floats(0.1, 100.0),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=100),
)
def test_wait_tells_what_take_would_and_spends_nothing(
    per_s: float, burst: int, gaps: list[float]
) -> None:
    # The controller asks `wait` before a token's lookup, then `take` after it.
    budget, now = WriteBudget(per_s, burst), 0.0
    for gap in gaps:
        now += gap
        waited = budget.wait("p", now)
        assert budget.wait("p", now) == waited  # asking spends nothing
        taken = budget.take("p", now)
        assert (waited == 0.0) == (taken == 0.0)
        if taken:
            assert abs(taken - waited) < 1e-9

"""Home cores (agent/placement.py): pure, no I/O."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from agent import placement, upkeep
from schemas.messages import AddonSpec, Resources

MIB = 1024 * 1024


def addon(n: int, cpus: float, deleted: bool = False) -> AddonSpec:
    return AddonSpec(
        id=f"{n:032x}",
        name=f"a{n}",
        kind="postgres",
        resources=Resources(cpus, 256),
        deleted=deleted,
    )


def cores_of(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def test_cpuset_is_dockers_notation() -> None:
    assert placement.cpuset([0]) == "0"
    assert placement.cpuset([1, 0]) == "0-1"
    assert placement.cpuset([0, 2, 3, 4, 7]) == "0,2-4,7"


def test_the_neighbour_and_the_hog_get_different_cores() -> None:
    # The noisy-neighbour bench's pair on a 2-vCPU host: the Team add-on (1 CPU) and the
    # hog (0.5 CPU) never share a core, whichever id sorts first.
    for ids in ((1, 2), (2, 1)):
        homes = placement.homes([addon(ids[0], 1.0), addon(ids[1], 0.5)], [0, 1])
        assert sorted(homes.values()) == ["0", "1"]


def test_one_cpu_or_none_places_nothing_and_tombstones_are_skipped() -> None:
    assert placement.homes([addon(1, 0.5)], [0]) == {}
    assert placement.homes([addon(1, 0.5)], []) == {}
    assert placement.homes([addon(1, 0.5, deleted=True), addon(2, 0.5)], [0, 1]) == {
        f"{2:032x}": "0"
    }


def test_a_plan_wider_than_the_host_gets_every_core() -> None:
    assert placement.homes([addon(1, 8.0)], [0, 1, 2, 3]) == {f"{1:032x}": "0-3"}
    assert placement.homes([addon(1, 1.5)], [0, 1, 2, 3]) == {f"{1:032x}": "0-1"}


def test_the_host_cpu_ids_are_used_as_they_are() -> None:
    homes = placement.homes([addon(1, 1.0), addon(2, 1.0)], [2, 5])
    assert sorted(homes.values()) == ["2", "5"]


plans = st.lists(st.sampled_from([0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0]), max_size=40)


@given(plans, st.integers(min_value=2, max_value=8))
def test_every_addon_gets_ceil_cpus_consecutive_cores_whatever_the_order(
    cpus: list[float], ncpus: int
) -> None:
    addons = [addon(i, c) for i, c in enumerate(cpus)]
    homes = placement.homes(addons, range(ncpus))
    assert set(homes) == {a.id for a in addons}
    for a in addons:
        cores = cores_of(homes[a.id])
        assert len(cores) == min(ncpus, math.ceil(a.resources.cpus))
        assert cores == list(range(cores[0], cores[0] + len(cores)))
        assert 0 <= cores[0] and cores[-1] < ncpus
    shuffled = addons[:]
    random.Random(len(cpus)).shuffle(shuffled)
    assert placement.homes(shuffled, range(ncpus)) == homes


@given(st.lists(st.sampled_from([0.1, 0.25, 0.5, 1.0]), max_size=60), st.integers(2, 8))
def test_plans_of_a_core_or_less_are_spread_evenly(cpus: list[float], ncpus: int) -> None:
    # Each goes to the least loaded core: the busiest core never carries more than the
    # idlest one plus the largest plan.
    homes = placement.homes([addon(i, c) for i, c in enumerate(cpus)], range(ncpus))
    load = [0.0] * ncpus
    for i, c in enumerate(cpus):
        load[int(homes[f"{i:032x}"])] += c
    assert max(load) - min(load) <= max(cpus, default=0) + 1e-9


def test_limits_differ_compares_the_home_cores_when_there_are_some() -> None:
    a = addon(1, 0.5)
    right = {"NanoCpus": 500_000_000, "Memory": 256 * MIB, "CpusetCpus": "1"}
    assert not upkeep.limits_differ(right, a, "1")
    assert upkeep.limits_differ(right, a, "0")
    assert upkeep.limits_differ({**right, "CpusetCpus": ""}, a, "1")
    # No placement wanted (home_cores off, one CPU): whatever set it has stays.
    assert not upkeep.limits_differ(right, a, "")


@given(st.sets(st.integers(0, 63)))
def test_cpus_of_reads_back_what_cpuset_writes(cpus: set[int]) -> None:
    assert placement.cpus_of(placement.cpuset(sorted(cpus))) == cpus


def test_cpus_of_reads_dockers_notation() -> None:
    assert placement.cpus_of("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert placement.cpus_of("") == set()


def test_a_move_waits_for_the_addons_starting_within_a_bound() -> None:
    wait = placement.MOVE_WAIT_MAX_S
    assert placement.move_now(False, None, 100.0)
    assert placement.move_now(False, 50.0, 100.0)
    assert not placement.move_now(True, None, 100.0)  # the first round waits
    assert not placement.move_now(True, 100.0, 100.0 + wait - 0.1)
    assert placement.move_now(True, 100.0, 100.0 + wait)  # never for ever

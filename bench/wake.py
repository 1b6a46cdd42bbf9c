"""Wake latency: connect -> first answered query on a sleeping add-on.

Postgres and Redis, from light sleep (docker pause) and deep sleep (docker stop), at least
20 wakes each (--quick: 5), with a baseline measured in the same run, interleaved.

  orkestr   a Starter add-on (plans file: light_after_s=1, deep_after_s=3) that the agent
            puts to sleep by itself. Before each wake the harness waits until Docker
            reports the database container paused / exited (then 0.3 s more, so the
            agent's sleep transition has returned). The client (bench/_client.py, in a
            toolbox container's network namespace on the project network) times
            t0 = just before asyncpg.connect / the Redis connection + PING on a fresh
            connection, t1 = first query (SELECT 1 / PING) answered. One attempt, no
            retry: in deep sleep the kernel must hold the SYN until the database answers
            (agent.deep_wake = "queue", the default; ORKESTR_BENCH_DEEP_WAKE=relay
            measures the wake listener and keeper relay instead).
  baseline  an equivalent plain container, run without the agent: the agent's own container
            spec (image, env, secret files, volume, CPU/memory limits, stop signal), a
            plain holder (`sleep infinity`) on the same project network and the database
            in its network namespace, as an add-on is laid out, so the address survives
            a stop. Put to sleep with `docker pause` / `docker stop` (Engine API). Timed
            from just before `docker unpause` / `docker start` (Engine API, aiodocker) to
            the first answered query, the same client polling it directly with a fresh
            connection + first query every 5 ms (each attempt started on time even if
            earlier ones hang; the first success wins).

Order in each round, so that nothing else is going on during a measurement: with the
add-on deeply asleep (stable), baseline light then baseline deep; then orkestr deep (this
wakes it); once it is paused again, orkestr light. The other add-on sleeps deeply meanwhile.

Prints a table and ends with one JSON line. Targets: ratio p50 <= 1.10, ratio p99 <= 1.25
(orkestr / baseline); absolute p50 <= 400 ms (Postgres, deep), <= 250 ms (Redis, deep),
<= 30 ms (light). With 20 samples p99 is (by linear interpolation) close to the maximum.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from _harness import (
    Bench,
    Client,
    Plain,
    activity,
    credentials,
    deep_wake_mode,
    log,
    machine_facts,
    percentile,
    plans_toml,
    print_context,
    rnd,
    run_cli,
    table,
)

from agent import model
from schemas.messages import Resources

CPUS, MEMORY_MB = 0.5, 256  # the packaged Starter plan's sizing
LIGHT_S, DEEP_S = 1.0, 3.0
SETTLE_S = 0.3
POLL = {"interval_ms": 5, "attempt_timeout_s": 2.0, "deadline_s": 60}
AGENT_WAKE = re.compile(
    r"addon\.wake addon=(?P<addon>\w+) stage=(?P<stage>\w+) .*? ms=(?P<ms>[\d.]+)"
)
TARGETS: dict[str, Any] = {
    "ratio_p50": 1.10,
    "ratio_p99": 1.25,
    "abs_p50_ms": {("postgres", "deep"): 400, ("redis", "deep"): 250,
                   ("postgres", "light"): 30, ("redis", "light"): 30},
}  # fmt: skip


async def ours_wake(b: Bench, client: Client, target: dict[str, Any], db: str) -> float:
    r = await client.once(target, timeout=60)
    if not r["ok"]:
        raise RuntimeError(f"wake failed for {db}: {r}")
    state = await b.state_of(db)
    if state != "running":
        raise RuntimeError(f"{db} answered but is {state}")
    return float(r["ms"])


async def baseline_wake(
    b: Bench, client: Client, plain: Plain, ip: str, stage: str
) -> tuple[float, float]:
    """(ms to the first answer, ms the Engine API call itself took)."""
    container = b.docker.containers.container(plain.db_name)
    if stage == "light":
        await container.pause()
    else:
        await container.stop()
    await b.wait_state(plain.db_name, "paused" if stage == "light" else "exited")
    await asyncio.sleep(SETTLE_S)
    await client.poll_start(plain.target(ip), **POLL)
    t0 = time.monotonic()
    if stage == "light":
        await container.unpause()
    else:
        await container.start()
    t_api = time.monotonic()
    r = await client.poll_result(90)
    if not r["ok"]:
        raise RuntimeError(f"baseline {plain.kind} did not answer after {stage} wake: {r}")
    return (r["t1"] - t0) * 1000, (t_api - t0) * 1000


async def bench_kind(
    b: Bench, client: Client, project_id: str, addon: dict[str, Any], kind: str, n: int
) -> dict[str, list[float]]:
    network = model.network_name(project_id)
    db = model.db_name(addon["id"])
    ip = await b.ip_on(model.holder_name(addon["id"]), network)
    target = {**credentials(await b.env(project_id), addon["name"]), "host": ip}
    plain = b.plain(kind, network, Resources(cpus=CPUS, memory_mb=MEMORY_MB), shared_netns=True)
    await plain.run_api()
    plain_ip = await plain.ip()
    await client.poll_start(plain.target(plain_ip), **POLL)
    if not (await client.poll_result(120))["ok"]:
        raise RuntimeError(f"baseline {kind} never became ready")
    samples: dict[str, list[float]] = {
        "orkestr_light": [], "orkestr_deep": [], "baseline_light": [], "baseline_deep": [],
        "api_unpause": [], "api_start": [],
    }  # fmt: skip
    # One unrecorded cycle of each, to warm caches.
    for i in range(n + 1):
        await b.wait_state(db, "exited", timeout=DEEP_S + 30)
        await asyncio.sleep(SETTLE_S)
        bl, bl_api = await baseline_wake(b, client, plain, plain_ip, "light")
        bd, bd_api = await baseline_wake(b, client, plain, plain_ip, "deep")
        if await b.state_of(db) != "exited":
            raise RuntimeError(f"{db} woke up without a client")
        od = await ours_wake(b, client, target, db)
        await b.wait_state(db, "paused", timeout=LIGHT_S + 30)
        await asyncio.sleep(SETTLE_S)
        ol = await ours_wake(b, client, target, db)
        log(
            f"{kind} {'warm-up' if i == 0 else f'{i}/{n}'}: light orkestr {ol:.1f} / "
            f"baseline {bl:.1f} ms, deep orkestr {od:.1f} / baseline {bd:.1f} ms"
        )
        if i == 0:
            continue
        samples["orkestr_light"].append(ol)
        samples["orkestr_deep"].append(od)
        samples["baseline_light"].append(bl)
        samples["baseline_deep"].append(bd)
        samples["api_unpause"].append(bl_api)
        samples["api_start"].append(bd_api)
    await plain.remove()
    return samples


def agent_wake_ms(log_text: str, addon_id: str) -> dict[str, list[float]]:
    """The agent's own wake durations (activator: wake start -> redirect removed)."""
    out: dict[str, list[float]] = {"light": [], "deep": []}
    for m in AGENT_WAKE.finditer(log_text):
        if m["addon"] == addon_id:
            out[m["stage"]].append(float(m["ms"]))
    return out


def summarise(
    kind: str, samples: dict[str, list[float]], agent: dict[str, list[float]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in ("light", "deep"):
        ours, base = samples[f"orkestr_{stage}"], samples[f"baseline_{stage}"]
        s: dict[str, Any] = {"n": len(ours)}
        for name, vals in (("orkestr", ours), ("baseline", base)):
            s[name] = {
                "p50_ms": rnd(percentile(vals, 50), 2),
                "p99_ms": rnd(percentile(vals, 99), 2),
                "min_ms": rnd(min(vals), 2),
                "max_ms": rnd(max(vals), 2),
                "ms": [rnd(v, 2) for v in vals],
            }
        api = samples["api_unpause" if stage == "light" else "api_start"]
        s["baseline"]["engine_api_call_p50_ms"] = rnd(percentile(api, 50), 2)
        # The agent logs every wake; the first one was the unrecorded warm-up.
        own = agent[stage][1:] if len(agent[stage]) > len(ours) else agent[stage]
        s["orkestr"]["agent_logged_wake_p50_ms"] = rnd(percentile(own, 50), 2)
        s["ratio_p50"] = rnd(s["orkestr"]["p50_ms"] / s["baseline"]["p50_ms"])
        s["ratio_p99"] = rnd(s["orkestr"]["p99_ms"] / s["baseline"]["p99_ms"])
        target_abs = TARGETS["abs_p50_ms"][(kind, stage)]
        s["target_abs_p50_ms"] = target_abs
        s["pass_ratio_p50"] = s["ratio_p50"] <= TARGETS["ratio_p50"]
        s["pass_ratio_p99"] = s["ratio_p99"] <= TARGETS["ratio_p99"]
        s["pass_abs_p50"] = s["orkestr"]["p50_ms"] <= target_abs
        out[stage] = s
    return out


async def main(quick: bool) -> dict[str, Any]:
    n = 5 if quick else 20
    results: dict[str, Any] = {"bench": "wake", "quick": quick, "wakes_per_case": n}
    results["machine"] = machine_facts()
    plans = plans_toml(cpus=CPUS, memory_mb=MEMORY_MB, light_after_s=LIGHT_S, deep_after_s=DEEP_S)
    results["deep_wake"] = deep_wake_mode()
    async with Bench(
        plans, sleep_tick_s=0.25, agent_extra=f'deep_wake = "{results["deep_wake"]}"'
    ) as b:
        results["code"] = b.code
        project = await b.project("starter")
        pid = project["id"]
        addons = {
            kind: await b.ready_addon(pid, f"{kind[:2]}-wake", kind)
            for kind in ("postgres", "redis")
        }
        client = await b.client(pid)
        results["activity_before"] = activity(b.host)
        all_samples = {}
        for kind, addon in addons.items():
            all_samples[kind] = await bench_kind(b, client, pid, addon, kind, n)
        assert b.agent is not None
        agent_log = b.agent.log_path.read_text(errors="replace")
        for kind, addon in addons.items():
            results[kind] = summarise(
                kind, all_samples[kind], agent_wake_ms(agent_log, addon["id"])
            )
        view = await b.addon(pid, addons["postgres"]["id"])
        results["agent_counters_postgres"] = {"sleeps": view["sleeps"], "wakes": view["wakes"]}
        results["activity_after"] = activity(b.host)
    results["targets"] = {
        "ratio_p50": TARGETS["ratio_p50"],
        "ratio_p99": TARGETS["ratio_p99"],
        "abs_p50_ms": {f"{k}_{s}": v for (k, s), v in TARGETS["abs_p50_ms"].items()},
    }
    return results


def report(results: dict[str, Any]) -> None:
    def ok(flag: bool) -> str:
        return "ok" if flag else "MISS"

    rows = []
    for kind in ("postgres", "redis"):
        for stage in ("light", "deep"):
            s = results[kind][stage]
            o, bl = s["orkestr"], s["baseline"]
            rows.append([
                kind, stage, s["n"], o["p50_ms"], o["p99_ms"], bl["p50_ms"], bl["p99_ms"],
                f"{s['ratio_p50']:.3f} {ok(s['pass_ratio_p50'])}",
                f"{s['ratio_p99']:.3f} {ok(s['pass_ratio_p99'])}",
                f"<= {s['target_abs_p50_ms']} {ok(s['pass_abs_p50'])}",
            ])  # fmt: skip
    print()
    print(table(
        ["kind", "from", "n", "ours p50", "ours p99", "base p50", "base p99",
         "ratio p50 (<=1.10)", "ratio p99 (<=1.25)", "abs p50 ms"],
        rows, "Wake: connect -> first answered query (ms); baseline: docker start/unpause -> first answer",
    ))  # fmt: skip
    print()
    rows = []
    for kind in ("postgres", "redis"):
        for stage in ("light", "deep"):
            s = results[kind][stage]
            rows.append([kind, stage, s["orkestr"]["p50_ms"], s["orkestr"]["agent_logged_wake_p50_ms"],
                         s["baseline"]["p50_ms"], s["baseline"]["engine_api_call_p50_ms"]])  # fmt: skip
    print(table(
        ["kind", "from", "ours: client p50", "ours: agent-logged wake p50",
         "base: client p50", "base: unpause/start API call p50"],
        rows, "Where the time goes (ms)",
    ))  # fmt: skip
    print()
    print_context(results)


if __name__ == "__main__":
    run_cli(__doc__, main, report, quick_help="5 wakes per case instead of 20")

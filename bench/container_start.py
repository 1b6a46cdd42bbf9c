"""A one-shot backup container's fixed cost by where its network comes from.

No controller, no agent: a holder-like container (the toolbox image, sleeping) on a
bridge network of its own, then one-shot toolbox containers created, started, awaited
and removed the way `BackupRunner._step` does (aiodocker, the same create body as the
agent's `specs.create_body`), whose script is `true`, in rounds that rotate the order of:
  bridge   their own endpoint on the bridge network (a Postgres step's; the Redis dump's
           before `rbackup10`)
  holder   `container:<holder id>`, the holder's namespace (the Redis dump's now)
  none     no network (verification's)
Per container: create, start (Docker's start returns), exit to Docker's wait answer
(timed from the start's return, less nothing: `true` exits at once), remove.

  .venv/bin/python bench/container_start.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import aiodocker

from agent import specs

IMAGE = "orkestr-local/toolbox:bookworm"
LABELS = {"orkestr.bench": "container_start"}


async def one(docker: aiodocker.Docker, tag: str, network: str) -> dict[str, float]:
    name = f"orkestr-bench-start-{tag}-{uuid.uuid4().hex[:8]}"
    joined = network.removeprefix("container:") if network.startswith("container:") else ""
    spec = specs.ContainerSpec(
        name=name,
        role="backup",
        project_id="bench",
        image=IMAGE,
        entrypoint=("bash", "-c"),
        cmd=("true",),
        network=None if joined else network,
        netns_of=joined or None,
        memory_mb=1024,
        pids_limit=256,
        cap_add=specs.DB_CAPABILITIES,
        extra_labels=tuple(LABELS.items()),
    )
    body = specs.create_body(spec, "bench")
    t0 = time.monotonic()
    container = await docker.containers.create(body, name=name)  # type: ignore[arg-type]
    t1 = time.monotonic()
    await container.start()
    t2 = time.monotonic()
    await container.wait(timeout=60)
    t3 = time.monotonic()
    await container.delete(force=True, v=True)
    t4 = time.monotonic()
    return {"create": t1 - t0, "start": t2 - t1, "exit": t3 - t2, "remove": t4 - t3}


async def main(rounds: int) -> dict[str, dict[str, list[float]]]:
    docker = aiodocker.Docker()
    tag = uuid.uuid4().hex[:8]
    net = f"orkestr-bench-start-{tag}"
    holder = f"{net}-holder"
    await docker.networks.create({"Name": net, "Labels": LABELS})
    try:
        h = await docker.containers.create(
            {
                "Image": IMAGE,
                "Cmd": ["sleep", "infinity"],
                "Labels": LABELS,
                "HostConfig": {"NetworkMode": net},
            },
            name=holder,
        )
        await h.start()
        holder_id = (await h.show())["Id"]
        kinds = {"bridge": net, "holder": f"container:{holder_id}", "none": "none"}
        out: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        order = list(kinds)
        await one(docker, tag, net)  # the image's layers in the page cache
        for r in range(rounds):
            for kind in order[r % 3 :] + order[: r % 3]:
                for phase, s in (await one(docker, tag, kinds[kind])).items():
                    out[kind].setdefault(phase, []).append(round(s, 4))
        return out
    finally:
        for c in await docker.containers.list(
            all=True, filters=json.dumps({"label": ["orkestr.bench=container_start"]})
        ):
            await c.delete(force=True)
        await (await docker.networks.get(net)).delete()
        await docker.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    results = asyncio.run(main(parser.parse_args().rounds))
    for kind, phases in results.items():
        medians = {p: round(statistics.median(v), 3) for p, v in phases.items()}
        print(kind, "median", medians, "all", json.dumps(phases))

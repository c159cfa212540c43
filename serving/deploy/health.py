"""Whether an application serves: while at least one of its pipelines has every layer-group worker
answering. The workers are asked directly (they are named actors, `worker_name`), not through a pipeline
replica: Serve would route the question to any one replica, which may be the one recovering."""

from __future__ import annotations

import asyncio

import ray

from serving.engine.exceptions import first_line

HEALTH_TIMEOUT_S = 10.0


def worker_name(app: str, replica: str, group: int) -> str:
    return f"adept-{app}-{replica}-group-{group}"


def _pipelines(app: str) -> dict[str, list[str]]:
    """The named layer-group workers of `app` that Ray knows alive or restarting, by pipeline replica."""
    prefix = f"adept-{app}-"
    found: dict[str, list[str]] = {}
    for name in ray.util.list_named_actors():
        if name.startswith(prefix) and "-group-" in name:
            found.setdefault(name[len(prefix) :].rsplit("-group-", 1)[0], []).append(name)
    return found


async def _answers(names: list[str]) -> None:
    await asyncio.gather(*(ray.get_actor(n).ping.remote() for n in names))


async def unhealthy(app: str, num_groups: int) -> str | None:
    """None while some pipeline of `app` serves; otherwise what is wrong, for the probe's answer."""
    pipelines = await asyncio.to_thread(_pipelines, app)
    complete = [names for names in pipelines.values() if len(names) == num_groups]
    if not complete:
        return f"no pipeline has its {num_groups} layer-group workers ({len(pipelines)} pipelines starting or lost)"
    pending = [asyncio.ensure_future(asyncio.wait_for(_answers(n), HEALTH_TIMEOUT_S)) for n in complete]
    problem = "no pipeline answered"
    for done in asyncio.as_completed(pending):
        try:
            await done
        except Exception as e:  # that pipeline's worker is dead, restarting or stuck
            problem = first_line(e)
            continue
        for p in pending:
            p.cancel()
        return None
    return f"no pipeline serves: {problem}"

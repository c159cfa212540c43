"""The pipeline replica: a Ray Serve deployment that owns one pipeline (a layer-group worker per group, in the
replica's placement group) and runs the same engine and scheduler as the in-process engine, calling the
groups through Ray."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import ray
from ray import serve

from serving.config import AppConfig
from serving.deploy.health import worker_name
from serving.deploy.ray_groups import RayGroup, ray_groups
from serving.engine import Engine
from serving.engine.exceptions import EngineError, EngineUnavailable, QueueFullError, RequestError
from serving.engine.messages import Admitted, Event, GenerateRequest, ModelInfo, Rejected, RequestOutput
from serving.engine.outputs import auto_interval
from serving.engine.speculative import MAX_SPECULATIVE_TOKENS
from serving.telemetry.metrics import RayStats
from workers.exit_pack import ExitPack

log = logging.getLogger(__name__)


@serve.deployment(name="PipelineReplica", health_check_period_s=10, health_check_timeout_s=60)
class PipelineReplica:
    def __init__(self, config: AppConfig, worker_resources: dict[str, float]) -> None:
        engine_config = config.engine

        def make_groups(_path: Path, plan, _pack: ExitPack | None) -> list[RayGroup]:
            context = serve.get_replica_context()
            name = functools.partial(worker_name, context.app_name, context.replica_id.unique_id)
            return ray_groups(
                engine_config, plan, worker_resources, config.worker_threads, name, config.worker_max_restarts
            )

        self.engine = Engine.build(engine_config, make_groups, lambda plan: RayStats(plan.num_layers))
        self.name = config.served_name()
        self.stream_interval = config.stream_interval
        plan = self.engine.plan
        log.info(
            "pipeline replica (pid %d): %s, %d layers in %d layer groups %s, exit points %s",
            os.getpid(), self.name, plan.num_layers, len(plan.groups),
            [(g.start, g.end) for g in plan.groups], list(plan.exit_points),
        )  # fmt: skip

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Event]:
        """Admitted (or Rejected), then the request's RequestOutputs (one per step, or per `stream_interval`
        tokens after the first), the last one finished.
        Cancelling the call (the client went away) aborts the request and frees its KV blocks."""
        try:
            prompt = request.prompt if request.messages is None else self._chat(request.messages)
            stream = self.engine.submit(prompt, request.sampling, request.exit, request.request_id, request.speculative)
        except (RequestError, QueueFullError, EngineUnavailable) as e:
            yield Rejected(e)
            return
        yield Admitted(prompt_tokens=stream.prompt_tokens)
        try:
            async for out in stream.chunks(self._interval()):
                if request.sampling.logprobs is not None or out.prompt is not None:
                    out.token_texts = self._texts(out)
                yield out
        except EngineError as e:
            yield Rejected(e)
        finally:
            stream.abort()

    def _interval(self) -> int | Callable[[], int]:
        if self.stream_interval == "auto":
            return lambda: auto_interval(self.engine.num_running)
        return self.stream_interval

    async def info(self) -> ModelInfo:
        plan = self.engine.plan
        return ModelInfo(
            self.name, plan.num_layers, list(plan.exit_points), len(plan.groups), plan.max_model_len,
            self.engine.exit_defaults.model_dump(exclude_none=True), self.engine.kv_cache_tokens,
            self.engine.config.speculative.model_dump(), self.engine.admission.draft_depths,
            self.engine.admission.auto_depth(self.engine.config.speculative.num_tokens or MAX_SPECULATIVE_TOKENS),
        )  # fmt: skip

    async def kv_blocks(self) -> dict:
        """KV blocks in use, by the scheduler and on every worker (after all requests ended: none)."""
        await self.engine.drain()
        return await self.engine.kv_blocks()

    async def workers(self) -> list[dict]:
        """Each layer-group worker's layers, process id, KV pool size and occupied blocks."""
        return await self.engine.workers()

    async def close(self, grace_s: float) -> int:
        """The server is stopping (`server.stop`): refuse new requests, give the admitted ones `grace_s`
        seconds, end the rest with finish_reason "abort"; returns how many were cut."""
        return await self.engine.close(grace_s)

    async def node(self) -> str:
        """The Ray node this replica runs on (its workers' are in `workers`)."""
        return ray.get_runtime_context().get_node_id()

    async def check_health(self) -> None:
        """Serve's health check: fails (and Serve replaces this replica with a new pipeline) only when the
        engine gave up on a lost worker; while it rebuilds, the replica is healthy."""
        if self.engine.broken:
            raise RuntimeError(f"this pipeline lost a worker for good: {self.engine.broken}")

    def _chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return self.engine.chat_prompt(messages)
        except Exception as e:  # the template refuses the conversation (roles out of order, ...)
            raise RequestError("messages", f"the model's chat template cannot format them: {e}") from None

    def _texts(self, out: RequestOutput) -> dict[int, str]:
        ids = set(out.token_ids)
        for top in out.top_logprobs or []:
            ids |= set(top)
        if out.prompt is not None:  # echo: the prompt's tokens and their alternatives too
            ids |= set(out.prompt.token_ids)
            for top in out.prompt.top_logprobs:
                ids |= set(top or ())
        tokenizer = self.engine.tokenizer
        return {i: tokenizer.decode([i]) for i in ids}

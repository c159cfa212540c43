"""The ingress deployment: the OpenAI-compatible HTTP API (FastAPI) and the gRPC service, both validating
requests (pydantic) before handing them to a pipeline replica, and both turning the replica's events into
responses.

Two rules for this module (tests/test_structure.py checks both): no `from __future__ import annotations`,
since FastAPI must see the routes' real `Request` annotations; and every helper sits above the Ingress
class, since `serve.ingress` serializes the routes when the class is decorated and only names that exist
by then reach the replica."""

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.exceptions import HTTPException

from protos.adept.v1 import adept_pb2 as pb
from serving.api.errors import ApiError
from serving.api.grpc_service import MalformedRequest
from serving.api.openai_api import ChatCompletionRequest, CompletionRequest, Responder
from serving.config import GRPC_SERVICE, AppConfig
from serving.deploy.health import unhealthy
from serving.engine.exceptions import EngineError, RequestError
from serving.engine.messages import Admitted, GenerateRequest, ModelInfo, Rejected, RequestOutput, Usage
from serving.engine.params import ExitParams, SamplingParams, request_error
from serving.engine.speculative import SpeculativeParams
from serving.telemetry import tracing
from serving.telemetry.metrics import ApiStats, node_metrics

log = logging.getLogger(__name__)

app = FastAPI(title="ADEPT Serve", description="Token-level early-exit LLM serving (OpenAI-compatible API)")

CHAT_ROLES = ("system", "developer", "user", "assistant")
# The live view at /: plain files shipped in the package, no build step.
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@app.exception_handler(HTTPException)
async def _http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """Unknown paths and methods answer with an OpenAI error object too, like every other refusal."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(error.status_code, "invalid_request_error")
    body = {"error": {"message": f"{request.method} {request.url.path}: {error.detail}", "type": kind}}
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.http_status, headers=error.headers())


def _invalid(error: RequestError) -> ApiError:
    return ApiError("invalid", str(error), error.param)


def _check_key(keys: list[bytes], authorization: str | None) -> None:
    """No keys configured: everyone may call. Otherwise `Bearer KEY` with one of the keys (compared in
    constant time; neither keys nor what clients send are ever logged)."""
    if not keys:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(given.strip().encode(), k) for k in keys):
        raise ApiError("unauthenticated", "a valid API key is required: send Authorization: Bearer <key>")


def _well_formed(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise ApiError("invalid", request.error)


def _grpc_authorization(context: RayServegRPCContext) -> str | None:
    return next((v for k, v in context.invocation_metadata() if k == "authorization"), None)


HEALTH_SERVICES = ("", GRPC_SERVICE)


def _grpc_error(context: RayServegRPCContext, error: ApiError) -> None:
    context.set_code(error.grpc_code)
    context.set_details(str(error))


def _grpc_token(out: RequestOutput, i: int) -> pb.GenerateResponse:
    message = pb.GenerateResponse(text=out.text, token_id=out.token_ids[i], exit_layer=out.exit_layers[i])
    if out.accepted is not None:
        message.accepted = out.accepted[i]
    if out.logprobs:
        message.logprob = out.logprobs[i]
        message.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=v) for t, v in out.top_logprobs[i].items())
    return message


def _grpc_prompt(message: pb.GenerateResponse, out: RequestOutput) -> None:
    p = out.prompt
    for token, layer, lp, top in zip(p.token_ids, p.exit_layers, p.logprobs, p.top_logprobs, strict=True):
        entry = message.prompt.add(token_id=token, exit_layer=layer)
        if lp is not None:
            entry.logprob = lp
        entry.top_logprobs.extend(pb.TopLogprob(token_id=t, logprob=v) for t, v in (top or {}).items())


EXIT_FIELDS = ("policy", "threshold", "min_depth", "max_depth", "backfill")


def _grpc_exit(request: pb.GenerateRequest) -> dict:
    exit = {f: getattr(request.adept, f) for f in EXIT_FIELDS if request.adept.HasField(f)}
    if request.HasField("prefill"):
        fields = (*EXIT_FIELDS, "full_depth_last")
        exit["prefill"] = {f: getattr(request.prefill, f) for f in fields if request.prefill.HasField(f)}
    return exit


SPECULATIVE_FIELDS = ("num_tokens", "draft_depth", "min_confidence")


def _grpc_speculative(request: pb.GenerateRequest) -> dict | None:
    """The request's speculative decoding (None: the server's default; its unset fields too)."""
    if not request.HasField("speculative"):
        return None
    s = request.speculative
    return {f: getattr(s, f) for f in SPECULATIVE_FIELDS if s.HasField(f)}


def _grpc_usage(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        layers_computed=usage.layers_computed,
        layers_total=usage.layers_total,
        prompt_layers_computed=usage.prompt_layers_computed,
        prompt_layers_total=usage.prompt_layers_total,
        draft_tokens=usage.draft_tokens,
        accepted_tokens=usage.accepted_tokens,
    )


def _grpc_model(info: ModelInfo) -> pb.Model:
    default = info.default_speculative
    depth = default.get("draft_depth")
    speculative = pb.SpeculativeControls(
        num_tokens=default.get("num_tokens", 0),
        draft_depth=None if depth == "auto" else depth,
        min_confidence=default.get("min_confidence", 0.0),
    )
    return pb.Model(
        id=info.name,
        num_layers=info.num_layers,
        exit_points=info.exit_points,
        num_layer_groups=info.num_layer_groups,
        max_model_len=info.max_model_len,
        draft_depths=info.draft_depths,
        default_speculative=speculative,
        auto_draft_depth=info.auto_draft_depth,
    )


async def _drain(events: DeploymentResponseGenerator, responder: Responder) -> RequestOutput:
    """Feed a request's outputs to its responder; returns the last (finished) one."""
    last = None
    async for event in events:
        if isinstance(event, Rejected):
            raise ApiError.of(event.error)
        responder.add(event)
        last = event
    return last


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, replica: DeploymentHandle, config: AppConfig) -> None:
        self.replica = replica
        self.model = config.served_name()
        self.max_body = config.max_request_bytes
        self.max_prompts = config.max_prompts_per_request
        self._keys = [k.encode() for k in config.accepted_keys()]
        self._info: ModelInfo | None = None
        self.stats = ApiStats()
        self.app_name = serve.get_replica_context().app_name
        self.num_groups = config.engine.num_layer_groups
        log.info("ingress: %s, API keys %s", self.model, f"required ({len(self._keys)})" if self._keys else "off")

    # ---- HTTP ----------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            _check_key(self._keys, request.headers.get("authorization"))
            body = await self._body(request, CompletionRequest)
            prompts = body.prompts()
            if len(prompts) > self.max_prompts:
                raise ApiError(
                    "invalid",
                    f"prompt: {len(prompts)} prompts in one request; this server takes at most {self.max_prompts} "
                    "(max_prompts_per_request)",
                    "prompt",
                )
            sampling = body.completion_sampling()
            request_id = _request_id(request)
            generates = [
                GenerateRequest(
                    request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
                    prompt=prompt,
                    messages=None,
                    sampling=sampling,
                    exit=body.exit_params(),
                    speculative=body.speculative_params(),
                )
                for i, prompt in enumerate(prompts)
            ]
            responders = [
                Responder(
                    chat=False,
                    model=self.model,
                    logprobs=body.logprobs is not None,
                    index=i,
                    echo=body.echo,
                    prompt_text=prompt if isinstance(prompt, str) else None,
                )
                for i, prompt in enumerate(prompts)
            ]
            for r in responders[1:]:  # one response: one id and time
                r.id, r.created = responders[0].id, responders[0].created
            return await self._http(generates, responders, body.stream, body.stream_options)
        except (ApiError, RequestError) as e:
            return self._refused(ApiError.of(e))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            _check_key(self._keys, request.headers.get("authorization"))
            body = await self._body(request, ChatCompletionRequest)
            logprobs = body.top_logprobs or 0 if body.logprobs else None
            generate = GenerateRequest(
                request_id=_request_id(request),
                prompt=None,
                messages=body.chat(),
                sampling=body.sampling(body.max_completion_tokens or body.max_tokens, logprobs),
                exit=body.exit_params(),
                speculative=body.speculative_params(),
            )
            responder = Responder(chat=True, model=self.model, logprobs=body.logprobs)
            return await self._http([generate], [responder], body.stream, body.stream_options)
        except (ApiError, RequestError) as e:
            return self._refused(ApiError.of(e))

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            _check_key(self._keys, request.headers.get("authorization"))
        except ApiError as e:
            return _error_response(e)
        info = await self._model_info()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": info.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "adept-serve",
                        "max_model_len": info.max_model_len,
                        "adept": {
                            "num_layers": info.num_layers,
                            "exit_points": info.exit_points,
                            "num_layer_groups": info.num_layer_groups,
                            "default_exit": info.default_exit,  # what requests get for unset controls
                            "kv_cache_tokens": info.kv_cache_tokens,
                            "default_speculative": info.default_speculative,  # for requests that leave it unset
                            "draft_depths": info.draft_depths,  # where exit heads are to draft from
                            "auto_draft_depth": info.auto_draft_depth,  # draft_depth 'auto' for the default
                        },
                    }
                ],
            }
        )

    @app.get("/")
    async def page(self) -> Response:
        """The live view: a completion streamed with every token coloured by its exit depth."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(self, name: str) -> Response:
        if name not in STATIC_FILES:
            return _error_response(ApiError("not_found", f"no file {name!r} here"))
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus exposition of this node: ADEPT's metrics with Ray's and Serve's (no request content)."""
        return PlainTextResponse(await node_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health(self) -> Response:
        """200 while some pipeline has every worker answering, else 503 (open to all: load balancers, probes)."""
        problem = await self._unhealthy()
        if problem:
            return JSONResponse({"status": "unavailable", "detail": problem}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _unhealthy(self) -> str | None:
        return await unhealthy(self.app_name, self.num_groups)

    def _refused(self, error: ApiError) -> JSONResponse:
        self.stats.outcome("http", error.kind)
        return _error_response(error)

    async def _body(self, request: Request, schema: type[BaseModel]) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError("too_large", f"the request body has {declared} bytes; the limit is {self.max_body}")
        raw = await request.body()
        if len(raw) > self.max_body:
            raise ApiError("too_large", f"the request body has {len(raw)} bytes; the limit is {self.max_body}")
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as e:
            if e.errors()[0]["type"] == "json_invalid":
                raise ApiError("invalid", f"the request body is not valid JSON: {e.errors()[0]['msg']}") from None
            raise _invalid(request_error(e)) from None
        if body.model != self.model:
            raise self._unknown(body.model)
        return body

    async def _http(
        self, requests: list[GenerateRequest], responders: list[Responder], stream: bool, options
    ) -> Response:
        """One response for the requests (one per prompt: choice i answers request i)."""
        started = []
        try:
            for request in requests:
                started.append(await self._start(request))
        except BaseException:
            for events in started:
                events.cancel()
            raise
        if stream:
            include_usage = options is not None and options.include_usage
            chunks = self._sse(started, responders, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        try:
            lasts = await asyncio.gather(*(_drain(events, r) for events, r in zip(started, responders, strict=True)))
        finally:
            for events in started:
                events.cancel()
        self.stats.outcome("http", "ok")
        choices = [r.choice(last.finish_reason) for r, last in zip(responders, lasts, strict=True)]
        usage = sum((last.usage for last in lasts[1:]), lasts[0].usage)
        return JSONResponse(responders[0].response(choices, usage))

    async def _sse(
        self, started: list[DeploymentResponseGenerator], responders: list[Responder], include_usage: bool
    ) -> AsyncIterator[str]:
        outcome = "aborted"  # unless it ends below: the client left
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, events: DeploymentResponseGenerator) -> None:
            try:
                async for event in events:
                    await queue.put((i, event))
            except Exception as e:  # the replica failed: tell the client in the stream
                await queue.put((i, Rejected(EngineError(str(e)))))
            await queue.put((i, None))

        pumps = [asyncio.create_task(pump(i, events)) for i, events in enumerate(started)]
        usages, open_ = [], len(started)
        try:
            if responders[0].chat:
                yield _sse(responders[0].role_chunk())
            while open_:
                i, event = await queue.get()
                if event is None:
                    open_ -= 1
                    continue
                if isinstance(event, Rejected):  # failed after it started: say so in the stream
                    error = ApiError.of(event.error)
                    outcome = error.kind
                    yield _sse(error.body())
                    break
                if event.token_ids or event.finished or event.prompt is not None:
                    yield _sse(responders[i].chunk(event, include_usage))
                if event.finished:
                    usages.append(event.usage)
            else:
                if include_usage:
                    yield _sse(responders[0].usage_chunk(sum(usages[1:], usages[0])))
                outcome = "ok"
            yield _sse("[DONE]")
        finally:
            self.stats.outcome("http", outcome)
            for task in pumps:
                task.cancel()
            for events in started:
                events.cancel()

    # ---- gRPC (adept.v1.AdeptService) ----------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            _check_key(self._keys, _grpc_authorization(grpc_context))
            _well_formed(request)
            with tracing.continuing(grpc_context.traceparent(), grpc_context.tracestate()):
                events = await self._start(self._grpc_request(request))
        except ApiError as e:
            self.stats.outcome("grpc", e.kind)
            _grpc_error(grpc_context, e)
            raise
        outcome = "aborted"
        try:
            async for event in events:
                if isinstance(event, Rejected):
                    error = ApiError.of(event.error)
                    outcome = error.kind
                    _grpc_error(grpc_context, error)
                    raise error
                messages = [_grpc_token(event, i) for i in range(len(event.token_ids))]
                for extra in messages[1:]:  # a merged output: the text goes with the first token
                    extra.text = ""
                if event.finished:
                    messages.append(
                        pb.GenerateResponse(
                            text="" if event.token_ids else event.text,
                            finish_reason=event.finish_reason,
                            usage=_grpc_usage(event.usage),
                        )
                    )
                    outcome = "ok"
                if event.prompt is not None and messages:
                    _grpc_prompt(messages[0], event)
                for message in messages:
                    yield message
        finally:
            self.stats.outcome("grpc", outcome)
            events.cancel()

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListModelsResponse:
        try:
            _check_key(self._keys, _grpc_authorization(grpc_context))
            _well_formed(request)
        except ApiError as e:
            _grpc_error(grpc_context, e)
            raise
        info = await self._model_info()
        return pb.ListModelsResponse(models=[_grpc_model(info)])

    # ---- gRPC (grpc.health.v1.Health): what /health says, for probes and load balancers -------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=await self._health_status(request, grpc_context))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each time it changes (checked every few seconds) until the client leaves."""
        last = None
        while True:
            status = await self._health_status(request, grpc_context)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(2)

    async def _health_status(self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext) -> int:
        try:
            _well_formed(request)
            if request.service not in HEALTH_SERVICES:
                raise ApiError("not_found", f"no service {request.service!r} here; ask for '' or {GRPC_SERVICE!r}")
        except ApiError as error:
            _grpc_error(grpc_context, error)
            raise
        serving = await self._unhealthy() is None
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    def _grpc_request(self, request: pb.GenerateRequest) -> GenerateRequest:
        if request.model and request.model != self.model:
            raise self._unknown(request.model)
        if bool(request.prompt) == bool(request.messages):
            raise ApiError("invalid", "prompt: give exactly one of prompt and messages", "prompt")
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise ApiError("invalid", f"messages[{i}].role: must be one of {', '.join(CHAT_ROLES)}", "messages")
        fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "prompt_logprobs")
        sampling = {f: getattr(request, f) for f in fields if request.HasField(f)}
        sampling |= {"stop": list(request.stop), "ignore_eos": request.ignore_eos}
        exit = _grpc_exit(request)
        try:
            sampling_params = SamplingParams.model_validate(sampling)
        except ValidationError as e:
            raise _invalid(request_error(e)) from None
        try:
            exit_params = ExitParams.model_validate(exit)
        except ValidationError as e:
            raise _invalid(request_error(e, "adept.")) from None
        speculative = _grpc_speculative(request)
        try:
            speculative_params = None if speculative is None else SpeculativeParams.model_validate(speculative)
        except ValidationError as e:
            raise _invalid(request_error(e, "adept.speculative.")) from None
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in request.messages
        ]
        return GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt=request.prompt or None,
            messages=messages or None,
            sampling=sampling_params,
            exit=exit_params,
            speculative=speculative_params,
        )

    # ---- both ----------------------------------------------------------------------------------------

    async def _start(self, request: GenerateRequest) -> DeploymentResponseGenerator:
        """Hand the request to a pipeline replica; raises ApiError if it is refused. Returns the remaining events."""
        events: DeploymentResponseGenerator = self.replica.options(stream=True).generate.remote(request)
        first = await events.__anext__()
        if isinstance(first, Rejected):
            events.cancel()
            raise ApiError.of(first.error)
        assert isinstance(first, Admitted)
        return events

    def _unknown(self, model: str) -> ApiError:
        return ApiError("not_found", f"model: {model!r} is not served here; this server serves {self.model!r}", "model")

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.replica.info.remote()
        return self._info

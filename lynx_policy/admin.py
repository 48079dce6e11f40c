"""Admin HTTP API (FastAPI): read state and replicas; change policy, SLO, mode, quality floor.

Every ``/v1`` route needs ``Authorization: Bearer <token>`` (401 when missing, 403 when
wrong; a client address with ``admin.auth_failures_per_peer`` failures in
``admin.auth_window_s`` gets 429 without a token check until the window clears). Bodies are
decoded and validated with msgspec (the same types the runtime uses); a bad body is a 422
whose ``detail`` says which field and why, and a body is refused by its Content-Length, or at
the cap while read in chunks, before it is buffered. Accepted changes become a new policy
version, persisted before they are sent; accepted, unchanged and rejected change attempts go
to the audit log (who: ``X-Lynx-Actor`` header + client address; never the token), auth
failures sampled per reason (``admin.audit_*``; every one is counted in
``lynx_controller_admin_rejections_total``). ``/healthz`` and ``/metrics`` are open,
``/docs`` and ``/openapi.json`` document the API.
"""

import hmac
import re
import time
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import msgspec
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lynx_policy.admin_ladder import add_ladder_routes, pinned_rung_policy
from lynx_policy.admin_replicas import add_replica_routes
from lynx_policy.admin_shadow import add_shadow_routes
from lynx_policy.config import (
    Mode,
    QualityFloor,
    SloTargets,
    validate_floor_fits,
    validate_slo,
)
from lynx_policy.tables import enforce_floor
from lynx_policy.throttle import PeerThrottle, SampledCount
from lynx_protocol.messages import policy_update_size
from lynx_protocol.policy import (
    PolicyError,
    PolicySpec,
    policy_document,
    validate_for_replica,
    validate_policy,
)

if TYPE_CHECKING:
    from lynx_policy.service import Controller

ACTOR_HEADER = "X-Lynx-Actor"
MAX_BODY_BYTES = 1 << 20
_ACTOR_RE = re.compile(r"^[\w.@:-]{1,64}$")
T = TypeVar("T")


class ModeBody(msgspec.Struct, forbid_unknown_fields=True):
    mode: Mode
    rung: str | None = None
    """With ``static``: pin this rung of the ladder (its tables on the adaptive buckets)."""


class SloBody(msgspec.Struct, forbid_unknown_fields=True):
    targets: SloTargets


class ModelResetBody(msgspec.Struct, forbid_unknown_fields=True):
    replica_id: str | None = None
    """Forget one replica's samples; null: every replica's."""


_BODY_TYPES = (PolicySpec, ModeBody, SloBody, QualityFloor, ModelResetBody)
_BODY_REFS, _COMPONENTS = msgspec.json.schema_components(
    _BODY_TYPES, ref_template="#/components/schemas/{name}")


def _body_doc(cls: type) -> dict[str, Any]:
    schema = _BODY_REFS[_BODY_TYPES.index(cls)]
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def _caller(request: Request) -> tuple[str, str]:
    actor = request.headers.get(ACTOR_HEADER, "admin")
    if not _ACTOR_RE.match(actor):
        actor = "invalid-actor-header"
    client = request.client.host if request.client else "unknown"
    return actor, client


def create_admin_app(controller: "Controller", token: str) -> FastAPI:
    app = FastAPI(title="Lynx policy controller", version="1",
                  description=__doc__.split("\n\n", 1)[1] if __doc__ else "")
    bearer = HTTPBearer(auto_error=False, description="LYNX_ADMIN_TOKEN")
    expected = token.encode()
    audit = controller.keeper.audit

    admin_config = controller.config.admin
    throttle = PeerThrottle(admin_config.auth_failures_per_peer, admin_config.auth_window_s)
    sampled = SampledCount(admin_config.audit_rejections_per_interval,
                           admin_config.audit_interval_s)

    def refuse(request: Request, reason: str, status: int, detail: str,
               headers: dict[str, str] | None = None) -> NoReturn:
        """Count every auth rejection; audit the mutating ones, sampled per reason."""
        actor, client = _caller(request)
        controller.metrics.admin_rejections.labels(reason=reason).inc()
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            passes, held = sampled.take(reason)
            if passes:
                extra = {"similar_not_audited": held} if held else {}
                audit.record(actor=actor, client=client, action=request.url.path,
                             outcome=reason, **extra)
        raise HTTPException(status, detail, headers=headers)

    def authorized(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> str:
        actor, client = _caller(request)
        wait_s = throttle.throttled(client)
        if wait_s > 0:
            refuse(request, "throttled", 429, "too many failed authentications",
                   {"Retry-After": str(max(1, round(wait_s)))})
        if credentials is None:
            throttle.failed(client)
            refuse(request, "unauthenticated", 401, "missing bearer token",
                   {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            throttle.failed(client)
            refuse(request, "forbidden", 403, "invalid bearer token")
        return actor

    Authorized = Annotated[str, Depends(authorized)]

    async def read_body(request: Request, cls: type[T], action: str) -> T:
        """Decode a JSON body of at most MAX_BODY_BYTES: refused by its Content-Length
        before a byte is read, else read in chunks and refused at the cap (never buffered
        whole first)."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            reject(request, action, 413, f"body larger than {MAX_BODY_BYTES} bytes (or a bad "
                   "Content-Length)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                reject(request, action, 413, f"body larger than {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return msgspec.json.decode(raw, type=cls)
        except msgspec.ValidationError as exc:
            reject(request, action, 422, str(exc))
        except msgspec.DecodeError as exc:
            reject(request, action, 422, f"body is not valid JSON: {exc}")
        raise AssertionError("unreachable")

    def reject(request: Request, action: str, status: int, reason: str) -> NoReturn:
        actor, client = _caller(request)
        audit.record(actor=actor, client=client, action=action, outcome="rejected",
                     status=status, reason=reason[:500])
        raise HTTPException(status, reason)

    def record(request: Request, action: str, **fields: Any) -> None:
        actor, client = _caller(request)
        audit.record(actor=actor, client=client, action=action, outcome="applied", **fields)

    def apply(request: Request, action: str, **fields: Any) -> None:
        actor, client = _caller(request)
        current = controller.keeper.state
        if all(getattr(current, name) == value for name, value in fields.items()):
            audit.record(actor=actor, client=client, action=action, outcome="unchanged",
                         version=current.version)
            return
        controller.change(actor=actor, client=client, action=action, **fields)

    def check_fits_replicas(request: Request, action: str, spec: PolicySpec) -> None:
        """The admin trust boundary: the change must respect the quality floor and be
        appliable by every connected replica (silent ones do not count)."""
        try:
            validate_floor_fits(spec, controller.keeper.state.floor)
            for replica in controller.hub.connected():
                reg = replica.registration
                validate_for_replica(spec, replica=reg.replica_id, policies=reg.policies,
                                     num_layers=reg.num_layers, num_experts=reg.num_experts,
                                     top_k=reg.top_k)
        except PolicyError as exc:
            reject(request, action, 422, str(exc))

    def policy_view() -> dict[str, Any]:
        state = controller.keeper.state
        return {"version": state.version, "mode": state.mode,
                "policy": policy_document(state.policy),
                "effective_policy": policy_document(state.effective_policy())}

    health_cache: dict[str, Any] = {"at": float("-inf"), "response": None}

    @app.get("/healthz", tags=["ops"], summary="Liveness and loop health (cached briefly)")
    def healthz() -> Response:
        now = time.monotonic()
        if now - health_cache["at"] < controller.config.admin.health_cache_s:
            return health_cache["response"]
        loop = controller.loop
        longest_wait = max(controller.config.loop.interval_s, *controller.config.loop.backoff_s)
        stuck = now - loop.last_tick_monotonic > 3 * longest_wait + 10.0
        failing = not controller.tasks_alive() or stuck
        behind = [r.replica_id for r in controller.hub.behind()]
        status = "failing" if failing else ("degraded" if loop.degraded or behind else "ok")
        body = {"status": status, "mode": controller.keeper.state.mode,
                "replicas_behind": behind,
                "policy_version": controller.keeper.state.version,
                "replicas_connected": len(controller.hub.connected()),
                "loop_error": loop.last_error}
        response = JSONResponse(body, status_code=503 if failing else 200)
        health_cache.update(at=now, response=response)
        return response

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics (lynx_controller_*)")
    def metrics() -> Response:
        controller.hub.housekeeping()
        return Response(controller.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/state", tags=["read"], summary="Mode, policy, SLO, floor, loop and link state")
    def get_state(_: Authorized) -> dict[str, Any]:
        state = controller.keeper.state
        report = controller.loop.last_report
        return {
            **policy_view(), "controller_id": state.controller_id,
            "slo": msgspec.to_builtins(state.slo), "floor": msgspec.to_builtins(state.floor),
            "updated_at": state.updated_at, "started_at": controller.started_at,
            "resumed": controller.keeper.resumed, "link": controller.config.link.bind,
            "replicas_connected": len(controller.hub.connected()),
            "replicas_known": len(controller.hub.replicas),
            "messages_received": controller.hub.received,
            "messages_rejected": controller.hub.rejected,
            "loop": {"degraded": controller.loop.degraded, "ticks": controller.loop.ticks,
                     "last_error": controller.loop.last_error,
                     "last_tick": None if report is None else report.__dict__,
                     "recent_ticks": [  # oldest first, without the latency detail
                         {"tick": r.tick, "at": r.at, "signal": r.signal,
                          "direction": r.direction, "version": r.version,
                          "unfixable": r.unfixable}
                         for r in controller.loop.reports]},
        }

    @app.get("/v1/replicas", tags=["read"], summary="Known replicas and their last statistics")
    def get_replicas(_: Authorized) -> dict[str, Any]:
        now = controller.hub.clock()
        link = controller.config.link
        version = controller.keeper.state.version
        return {"policy_version": version, "replicas": [
            {**r.view(now, link.replica_stale_s),
             "status": r.status(now, version, link.ack_timeout_s)}
            for r in controller.hub.replicas.values()]}

    @app.get("/v1/policy", tags=["policy"], summary="Stored and effective policy with version")
    def get_policy(_: Authorized) -> dict[str, Any]:
        return policy_view()

    @app.put("/v1/policy", tags=["policy"], summary="Replace the policy (new version)",
             openapi_extra=_body_doc(PolicySpec))
    async def put_policy(request: Request, _: Authorized) -> dict[str, Any]:
        spec = await read_body(request, PolicySpec, "put_policy")
        try:
            validate_policy(spec)
        except PolicyError as exc:
            reject(request, "put_policy", 422, str(exc))
        size, limit = policy_update_size(spec), controller.config.link.max_message_bytes
        if size > limit:  # never persist what the link cannot carry
            reject(request, "put_policy", 422,
                   f"policy encodes to {size} bytes, over the link's {limit}-byte message limit")
        check_fits_replicas(request, "put_policy", spec)
        apply(request, "put_policy", policy=spec)
        return policy_view()

    @app.get("/v1/mode", tags=["policy"], summary="Controller mode: off, static or adaptive")
    def get_mode(_: Authorized) -> dict[str, Any]:
        return {"mode": controller.keeper.state.mode}

    @app.put("/v1/mode", tags=["policy"], summary="Change the mode (new version)",
             openapi_extra=_body_doc(ModeBody))
    async def put_mode(request: Request, _: Authorized) -> dict[str, Any]:
        body = await read_body(request, ModeBody, "put_mode")
        if body.rung is None:
            apply(request, "put_mode", mode=body.mode)
        else:
            try:
                if body.mode != "static":
                    raise PolicyError("'rung' pins a static policy: give mode 'static'")
                spec = pinned_rung_policy(controller, body.rung)
            except PolicyError as exc:
                reject(request, "put_mode", 422, str(exc))
            check_fits_replicas(request, "put_mode", spec)
            apply(request, "put_mode", mode="static", policy=spec)
        return {"mode": controller.keeper.state.mode, "version": controller.keeper.state.version}

    @app.get("/v1/slo", tags=["policy"], summary="SLO targets")
    def get_slo(_: Authorized) -> dict[str, Any]:
        return {"targets": msgspec.to_builtins(controller.keeper.state.slo)}

    @app.put("/v1/slo", tags=["policy"], summary="Replace the SLO targets",
             openapi_extra=_body_doc(SloBody))
    async def put_slo(request: Request, _: Authorized) -> dict[str, Any]:
        body = await read_body(request, SloBody, "put_slo")
        try:
            validate_slo(body.targets)
        except ValueError as exc:
            reject(request, "put_slo", 422, str(exc))
        apply(request, "put_slo", slo=body.targets)
        return {"targets": msgspec.to_builtins(controller.keeper.state.slo),
                "version": controller.keeper.state.version}

    @app.get("/v1/floor", tags=["policy"], summary="Quality floor (minimum budgets)")
    def get_floor(_: Authorized) -> dict[str, Any]:
        return msgspec.to_builtins(controller.keeper.state.floor)

    @app.put("/v1/floor", tags=["policy"], summary="Replace the quality floor",
             openapi_extra=_body_doc(QualityFloor))
    async def put_floor(request: Request, _: Authorized) -> dict[str, Any]:
        floor = await read_body(request, QualityFloor, "put_floor")
        num_experts = controller.num_experts()
        for replica in controller.hub.connected():
            layers = replica.registration.num_layers
            if floor.per_layer is not None and len(floor.per_layer) != layers:
                reject(request, "put_floor", 422, f"per_layer has {len(floor.per_layer)} "
                       f"entries, replica {replica.replica_id} has {layers} MoE layers")
        if floor.highest() > num_experts:
            reject(request, "put_floor", 422,
                   f"floor {floor.highest()} exceeds the expert count {num_experts}")
        policy = enforce_floor(controller.keeper.state.policy, floor, num_experts)
        apply(request, "put_floor", floor=floor, policy=policy)
        return {**msgspec.to_builtins(controller.keeper.state.floor),
                "version": controller.keeper.state.version}

    @app.get("/v1/model", tags=["read"],
             summary="Latency models, the budget table they imply and why, per bucket")
    def get_model(_: Authorized) -> dict[str, Any]:
        return controller.loop.model_view()

    @app.post("/v1/model/reset", tags=["policy"], summary="Forget learnt latency samples",
              openapi_extra=_body_doc(ModelResetBody))
    async def reset_model(request: Request, _: Authorized) -> dict[str, Any]:
        body = await read_body(request, ModelResetBody, "reset_model")
        dropped = controller.loop.models.reset(body.replica_id)
        record(request, "reset_model", replica_id=body.replica_id, replicas_forgotten=dropped)
        return {"replicas_forgotten": dropped}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version,
                              description=app.description, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(_COMPONENTS)
            app.openapi_schema = doc
        return app.openapi_schema

    add_ladder_routes(app, controller, Authorized, read_body, reject, record)
    add_shadow_routes(app, controller, Authorized, read_body, reject, record)
    add_replica_routes(app, controller, Authorized, record)
    app.openapi = openapi  # type: ignore[method-assign]
    return app

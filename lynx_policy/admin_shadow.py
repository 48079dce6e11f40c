"""Admin routes for the fleet's shadow statistics (`lynx_policy.shadow_store`) and the ladder
proposal an operator reviews before it is applied:

- ``GET /v1/shadow``: the statistics held (shape, budgets, measured steps per bucket,
  contributing replicas); ``DELETE /v1/shadow`` forgets them and the proposal.
- ``POST /v1/ladder/proposal`` (a JSON object, ``{}`` for the defaults: ``means``,
  ``min_steps`` 200, ``max_mass_lost`` 0.1, ``name``): build a ``mass_lost`` ladder from the
  statistics held now (in a worker thread; 422 with one line when they cannot make one) and
  keep it for review.
- ``GET /v1/ladder/proposal``: the proposal (its ``id``, summary, report and the ladder itself).
- ``POST /v1/ladder/proposal/accept`` with ``{"id": ...}``: make that proposal the controller's
  ladder, with ``PUT /v1/ladder``'s checks (every connected replica's shape). 409 when the
  proposal was rebuilt since (the id is a digest of the ladder): nothing unreviewed is applied.
(No ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime.)
"""

import asyncio
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import msgspec
from fastapi import FastAPI, Request

from lynx_policy.ladders import misfit_of
from lynx_policy.shadow_store import build_proposal
from lynx_protocol.policy import MAX_EXPERTS
from lynx_protocol.shadow import ShadowError

if TYPE_CHECKING:
    from lynx_policy.service import Controller


class ProposalRequest(msgspec.Struct, forbid_unknown_fields=True):
    means: Annotated[list[Annotated[float, msgspec.Meta(ge=1.0, le=MAX_EXPERTS)]],
                     msgspec.Meta(max_length=16)] | None = None
    min_steps: Annotated[int, msgspec.Meta(ge=1)] = 200
    max_mass_lost: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.1
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""


class AcceptRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(max_length=64)]


def proposal_view(proposal: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/ladder/proposal`` shows: a summary, and the ladder itself."""
    ladder = proposal["ladder"]
    return {
        "id": proposal["id"], "built_at": proposal["built_at"], "cost_kind": ladder.kind,
        "replicas": proposal["replicas"],
        "rungs": [{"name": r.name, "experts_computed": round(r.experts(), 3),
                   "cost": r.cost(ladder.kind), "batches": [t.batch for t in r.tables]}
                  for r in ladder.rungs],
        "dropped": [{"name": d.name, "reason": d.reason} for d in ladder.dropped],
        "steps_by_bucket": {str(k or "inf"): v
                            for k, v in proposal["report"]["steps_by_bucket"].items()},
        "ladder": msgspec.to_builtins(ladder),
    }


def add_shadow_routes(app: FastAPI, controller: "Controller", authorized: Any,
                      read_body: Callable[..., Any], reject: Callable[..., NoReturn],
                      record: Callable[..., None]) -> None:
    """Register the routes; the helpers are `create_admin_app`'s (auth, body decode with its
    size cap, audited rejection, audit record of the caller)."""
    store = controller.shadow
    building = asyncio.Lock()

    @app.get("/v1/shadow", tags=["policy"], summary="The fleet's shadow statistics")
    def get_shadow(_: authorized) -> dict[str, Any]:
        shape = store.shape() or {}
        return {
            "model": shape.get("model"), "budgets": shape.get("budgets"),
            "every": shape.get("every"),
            "steps_by_bucket": {str(k or "inf"): v for k, v in store.steps_by_bucket().items()},
            "replicas": store.replicas(),
            "refused": store.refused,
            "proposal": None if store.proposal is None else store.proposal["id"],
        }

    @app.delete("/v1/shadow", tags=["policy"], summary="Forget the shadow statistics")
    def delete_shadow(request: Request, _: authorized) -> dict[str, Any]:
        store.reset()
        controller.metrics.shadow_steps.clear()
        record(request, "delete_shadow")
        return {"steps_by_bucket": {}}

    @app.post("/v1/ladder/proposal", tags=["policy"],
              summary="Build a ladder proposal from the shadow statistics (review, then accept)")
    async def post_proposal(request: Request, _: authorized) -> dict[str, Any]:
        body = await read_body(request, ProposalRequest, "ladder_proposal")
        if body.means is not None and not all(math.isfinite(m) for m in body.means):
            reject(request, "ladder_proposal", 422, "means must be finite")
        if building.locked():
            reject(request, "ladder_proposal", 409, "a proposal is being built")
        async with building:
            generation = store.generation
            try:
                proposal = await asyncio.to_thread(  # a snapshot: the hub keeps adding
                    build_proposal, store.data(), list(store.replicas()),
                    body.means, body.min_steps, body.max_mass_lost, body.name)
            except ShadowError as exc:
                reject(request, "ladder_proposal", 422, str(exc))
            if store.generation != generation:  # DELETE /v1/shadow while it was built
                reject(request, "ladder_proposal", 409, "the shadow statistics were reset "
                       "while the proposal was built: build it again")
            store.proposal = proposal
        record(request, "ladder_proposal", id=proposal["id"],
               rungs=[r.name for r in proposal["ladder"].rungs])
        return proposal_view(proposal)

    @app.get("/v1/ladder/proposal", tags=["policy"], summary="The ladder proposal to review")
    def get_proposal(request: Request, _: authorized) -> dict[str, Any]:
        if store.proposal is None:
            reject(request, "get_ladder_proposal", 404,
                   "no ladder proposal: POST /v1/ladder/proposal first")
        return proposal_view(store.proposal)

    @app.post("/v1/ladder/proposal/accept", tags=["policy"],
              summary="Apply the reviewed proposal as the controller's ladder")
    async def accept_proposal(request: Request, _: authorized) -> dict[str, Any]:
        body = await read_body(request, AcceptRequest, "accept_ladder_proposal")
        try:
            ladder = store.accepted(body.id)
        except LookupError as exc:
            reject(request, "accept_ladder_proposal", 404, str(exc.args[0]))
        except ValueError as exc:
            reject(request, "accept_ladder_proposal", 409, str(exc))
        misfit = misfit_of(ladder, (r.registration for r in controller.hub.connected()))
        if misfit is not None:
            reject(request, "accept_ladder_proposal", 422, misfit)
        controller.ladders.replace(ladder, f"shadow proposal {body.id}")
        record(request, "accept_ladder_proposal", id=body.id,
               rungs=[r.name for r in ladder.rungs])
        return controller.ladders.view(r.registration for r in controller.hub.connected())


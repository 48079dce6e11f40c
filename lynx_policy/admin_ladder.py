"""Admin routes for the ladder (`lynx_policy.ladders`): ``GET/PUT/DELETE /v1/ladder``, and the
policy that pins one rung for ``PUT /v1/mode`` with ``{"mode": "static", "rung": NAME}``.

A ladder is validated against every connected replica's model shape before it is accepted
(422 naming the replica); it is persisted in ``state.dir`` and audited, but is no policy
version: the runtimes only ever see the budget tables the planner makes of it.
(No ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime.)
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from fastapi import FastAPI, Request

from lynx_policy.config import validate_floor_fits
from lynx_policy.ladders import misfit_of
from lynx_protocol.ladder import Ladder, LadderError, rung_policy, validate_ladder
from lynx_protocol.policy import PolicyError, PolicySpec

if TYPE_CHECKING:
    from lynx_policy.service import Controller


def pinned_rung_policy(controller: "Controller", name: str) -> PolicySpec:
    """The static policy that applies rung ``name`` of the controller's ladder on the
    adaptive buckets. Raises PolicyError (no ladder, one that does not fit a connected
    replica, an unknown rung, or one below the quality floor)."""
    store = controller.ladders
    if store.ladder is None:
        raise PolicyError("no ladder: PUT /v1/ladder or set 'ladder' in the config first")
    misfit = store.misfit(r.registration for r in controller.hub.connected())
    if misfit is not None:
        raise PolicyError(f"the ladder does not fit: {misfit}")
    settings = controller.config.adaptive
    try:
        policy = rung_policy(store.ladder, name, settings.buckets, settings.min_batch)
    except LadderError as exc:
        raise PolicyError(str(exc)) from None
    validate_floor_fits(policy, controller.keeper.state.floor)
    return policy


def add_ladder_routes(app: FastAPI, controller: "Controller", authorized: Any,
                      read_body: Callable[..., Any], reject: Callable[..., NoReturn],
                      record: Callable[..., None]) -> None:
    """Register the ladder routes; the helpers are `create_admin_app`'s (auth, body decode
    with its size cap, audited rejection, audit record of the caller)."""

    def view() -> dict[str, Any]:
        return controller.ladders.view(r.registration for r in controller.hub.connected())

    @app.get("/v1/ladder", tags=["policy"], summary="The ladder the planner plans over")
    def get_ladder(_: authorized) -> dict[str, Any]:
        return view()

    @app.put("/v1/ladder", tags=["policy"], summary="Replace the ladder (lynx-ladder/1)")
    async def put_ladder(request: Request, _: authorized) -> dict[str, Any]:
        ladder = await read_body(request, Ladder, "put_ladder")
        try:
            validate_ladder(ladder, where="ladder")
        except LadderError as exc:
            reject(request, "put_ladder", 422, str(exc))
        misfit = misfit_of(ladder, (r.registration for r in controller.hub.connected()))
        if misfit is not None:
            reject(request, "put_ladder", 422, misfit)
        controller.ladders.replace(ladder, "PUT /v1/ladder")
        record(request, "put_ladder", rungs=[r.name for r in ladder.rungs])
        return view()

    @app.delete("/v1/ladder", tags=["policy"], summary="Forget the ladder (uniform budgets)")
    def delete_ladder(request: Request, _: authorized) -> dict[str, Any]:
        controller.ladders.replace(None, "none")
        record(request, "delete_ladder")
        return view()

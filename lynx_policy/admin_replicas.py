"""Admin route ``DELETE /v1/replicas/{replica_id}``: forget a replica and release its id from
the CURVE key that owns it (`lynx_policy.owners`), e.g. to move an id to a new key without
removing the old key from the allow-list first. Audited.
(No ``from __future__ import annotations``: FastAPI reads the route's annotations at runtime.)
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, HTTPException, Request

if TYPE_CHECKING:
    from lynx_policy.service import Controller


def add_replica_routes(app: FastAPI, controller: "Controller", authorized: Any,
                       record: Callable[..., None]) -> None:
    """Register the route; ``authorized`` and ``record`` are `create_admin_app`'s."""

    @app.delete("/v1/replicas/{replica_id}", tags=["policy"],
                summary="Forget a replica and release its id from its key")
    def delete_replica(replica_id: str, request: Request, _: authorized) -> dict[str, Any]:
        hub = controller.hub
        known = hub.replicas.pop(replica_id, None) is not None
        released = hub.owners.release(replica_id) if hub.owners is not None else False
        if not (known or released):
            raise HTTPException(404, f"no replica {replica_id!r}")
        record(request, "delete_replica", replica_id=replica_id, key_released=released)
        return {"replica_id": replica_id, "forgotten": known, "key_released": released}

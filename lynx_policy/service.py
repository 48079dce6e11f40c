"""Wiring of one controller process: state, ZMQ hub, control loop and admin HTTP server.

Everything runs on one asyncio event loop (no threads, no locks): the hub's receive loop, the
control loop and uvicorn's server are tasks of it, and every state change happens between two
awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx
import uvicorn

from lynx_policy.config import ControllerConfig
from lynx_policy.http import RepeatFilter, raise_fd_limit, with_deadline
from lynx_policy.hub import Hub
from lynx_policy.ladders import LadderStore
from lynx_policy.loop import ControlLoop
from lynx_policy.metrics import ControllerMetrics
from lynx_policy.observe import make_observer
from lynx_policy.shadow_store import ShadowStore
from lynx_policy.state import PersistedState, StateKeeper
from lynx_policy.tables import mean_budgets
from lynx_protocol.messages import PolicyUpdate

log = logging.getLogger(__name__)


class Controller:
    """One controller; construct inside a running event loop, then ``await run()``."""

    def __init__(self, config: ControllerConfig, admin_token: str) -> None:
        from lynx_policy.admin import create_admin_app  # admin imports this module's type

        self.config = config
        self.started_at = time.time()
        self.metrics = ControllerMetrics()
        self.keeper = StateKeeper(config)
        self.ladders = LadderStore(config.state.dir, config.ladder)
        self._update = self.keeper.state.update_message()
        self.shadow = ShadowStore(config.state.dir)
        for edge, steps in self.shadow.steps_by_bucket().items():  # persisted: resumed
            self.metrics.shadow_steps.labels(max_batch=str(edge or "inf")).set(steps)
        self.hub = Hub(config.link, self.metrics, self.current_update,
                       state_dir=config.state.dir, shadow=self.shadow)
        self.http = httpx.AsyncClient()
        self.observer = make_observer(config.observe, self.http, self._registered_metrics_urls)
        self.loop = ControlLoop(config, self.keeper, self.hub, self.metrics, self.observer,
                                self.state_changed, self.ladders)
        self.app = create_admin_app(self, admin_token)
        self.stop_event = asyncio.Event()
        self.server: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.state_changed()

    def current_update(self) -> PolicyUpdate:
        return self._update

    def _registered_metrics_urls(self) -> list[tuple[str, str]]:
        """(metrics_url, the address the link saw the runtime connect from) per replica."""
        return [(r.registration.metrics_url, r.peer_address) for r in self.hub.connected()]

    def num_experts(self) -> int:
        return self.hub.num_experts() or self.config.adaptive.default_num_experts

    def state_changed(self) -> None:
        """Refresh the cached update and metrics, and tell every connected replica."""
        state = self.keeper.state
        self._update = state.update_message()
        self.metrics.set_mode(state.mode)
        self.metrics.policy_version.set(state.version)
        self.metrics.set_budgets(mean_budgets(state.effective_policy(), self.num_experts()))
        self.hub.broadcast()

    def change(self, *, actor: str, client: str, action: str, **fields: Any) -> PersistedState:
        state = self.keeper.change(actor=actor, client=client, action=action, **fields)
        self.state_changed()
        log.info("%s by %s (%s) → policy version %d", action, actor, client, state.version)
        return state

    def tasks_alive(self) -> bool:
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def request_stop(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.should_exit = True

    async def run(self) -> None:
        admin = self.config.admin
        soft, _ = raise_fd_limit(log)
        repeats = RepeatFilter()
        for name in ("asyncio", "uvicorn.error"):  # e.g. accept() failing under fd exhaustion
            logging.getLogger(name).addFilter(repeats)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host=admin.host, port=admin.port, log_level="warning",
            access_log=False, lifespan="off", server_header=False,
            http=with_deadline(admin.header_timeout_s,
                               min(admin.max_connections, max(16, soft // 2))),
            ssl_certfile=admin.tls_cert_file or None, ssl_keyfile=admin.tls_key_file or None))
        self._tasks = [asyncio.create_task(self.hub.serve(), name="lynx-hub"),
                       asyncio.create_task(self.loop.run(self.stop_event), name="lynx-loop")]
        if self.config.link.curve:  # handshakes refused before ZAP (no CURVE) are counted
            self._tasks.append(asyncio.create_task(self.hub.watch_handshakes(),
                                                   name="lynx-handshakes"))
        state = self.keeper.state
        log.info("lynx-policy serving: link %s, admin http://%s:%d, mode %s, policy version %d%s",
                 self.config.link.bind, admin.host, admin.port, state.mode, state.version,
                 " (resumed persisted state; config's mode/policy/slo/floor ignored)"
                 if self.keeper.resumed else "")
        try:
            await self.server.serve()
        finally:
            self.stop_event.set()
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.http.aclose()
            self.hub.close()
            with contextlib.suppress(OSError):  # a full disk loses the last seconds only
                self.shadow.persist()
            log.info("lynx-policy stopped at policy version %d", self.keeper.state.version)


async def serve(config: ControllerConfig, admin_token: str) -> None:
    controller = Controller(config, admin_token)
    await controller.run()

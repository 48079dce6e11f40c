"""Controller configuration: one frozen, typed `ControllerConfig` built from a file plus env.

The file is TOML (``.toml``) or JSON (``.json``). Environment variables override single keys:
``LYNX_POLICY__<SECTION>__<KEY>=<value>`` (value parsed as JSON when it parses, else taken as
a string), e.g. ``LYNX_POLICY__LOOP__INTERVAL_S=2`` or ``LYNX_POLICY__MODE=adaptive``.
Every problem is raised as `ConfigError` with a one-line message naming the key.

``mode``, ``policy``, ``slo`` and ``floor`` are the *initial* state: once the controller has
persisted state in ``state.dir`` (any admin change, any adaptive step), the persisted state
wins at start-up and these keys are ignored (the log says so).
"""

from __future__ import annotations

import itertools
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from lynx_protocol.endpoints import EndpointError, default_endpoint, validate_endpoint
from lynx_protocol.ladder import load_ladder
from lynx_protocol.messages import MAX_MESSAGE_BYTES
from lynx_protocol.policy import (
    MAX_BATCH,
    MAX_BUCKETS,
    MAX_EXPERTS,
    MAX_LAYERS,
    PolicyError,
    PolicySpec,
    validate_policy,
)

ENV_PREFIX = "LYNX_POLICY__"
TOKEN_ENV = "LYNX_ADMIN_TOKEN"
MIN_TOKEN_CHARS = 16

Mode = Literal["off", "static", "adaptive"]
MODES: tuple[str, ...] = ("off", "static", "adaptive")
SloMetric = Literal["itl", "ttft", "tpot", "e2e"]
SLO_HISTOGRAMS: dict[str, str] = {
    "itl": "sglang:inter_token_latency_seconds",
    "ttft": "sglang:time_to_first_token_seconds",
    "tpot": "sglang:request_time_per_output_token_seconds",
    "e2e": "sglang:e2e_request_latency_seconds",
}
"""SGLang 0.5.23 histogram behind each SLO metric (there is no time_per_output_token)."""

# Bounds on every list that enters through the config file or the admin API (one place: the
# admin API decodes the same types, so both refuse an oversized list with the field's path).
MAX_SLO_TARGETS = 16
MAX_SCRAPE_URLS = 64
MAX_BACKOFF_STEPS = 16

PositiveFloat = Annotated[float, msgspec.Meta(gt=0.0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(ValueError):
    """Bad configuration; the message is one line and names the offending key."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SloTarget(_Section, frozen=True):
    """Latency objective: the ``quantile`` of ``metric`` must stay <= ``target_ms``."""

    metric: SloMetric = "itl"
    quantile: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.99
    target_ms: Annotated[float, msgspec.Meta(gt=0.0, le=3_600_000.0)] = 100.0


class QualityFloor(_Section, frozen=True):
    """Most aggressive reduction allowed: the adaptive loop never goes below these budgets."""

    min_budget: Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)] = 2
    """Minimum experts per layer and step [experts], for every layer."""
    per_layer: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=MAX_EXPERTS)]],
                         msgspec.Meta(max_length=MAX_LAYERS)] | None = None
    """Optional per-layer minimum [experts]; the effective floor is max(min_budget, this)."""

    min_mass_kept: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.0
    """Optional floor on the expected routing mass kept [fraction of the stock top-k gate
    mass]; the model-based planner never picks a budget it expects to keep less (0: none)."""

    def for_layer(self, layer: int) -> int:
        if self.per_layer is not None and layer < len(self.per_layer):
            return max(self.min_budget, self.per_layer[layer])
        return self.min_budget

    def highest(self) -> int:
        return max([self.min_budget, *(self.per_layer or [])])


class LinkConfig(_Section, frozen=True):
    bind: str = msgspec.field(default_factory=default_endpoint)
    """ZMQ ROUTER endpoint runtimes connect to: ``ipc:///path`` or ``tcp://host:5790``."""
    max_message_bytes: PositiveInt = MAX_MESSAGE_BYTES
    replica_stale_s: PositiveFloat = 10.0
    """A replica unheard for this long no longer counts as connected [s]."""
    replica_forget_s: PositiveFloat = 3600.0
    """A replica unheard for this long is dropped from the registry [s]."""
    resend_s: PositiveFloat = 2.0
    """Minimum gap between re-sends of the current policy to a lagging replica [s]."""
    ack_timeout_s: PositiveFloat = 10.0
    """A connected replica that has not acknowledged the current version for this long makes
    ``/healthz`` degraded [s] (acknowledged but not yet applied, e.g. idle, is fine)."""
    send_queue: PositiveInt = 1000
    curve_server_secret: str = ""
    """CURVE: the controller's key pair (``lynx-policy keys generate``: ``NAME.key_secret``)."""
    curve_clients_dir: str = ""
    """CURVE: directory of allowed runtime public keys (``*.key``), re-read on change."""
    plaintext_tcp: bool = False
    """Explicit opt-in to an unauthenticated, unencrypted ``tcp://`` link (warned at start)."""
    max_replicas: PositiveInt = 256
    """Registered replicas at most; registrations beyond it are refused and counted."""

    @property
    def curve(self) -> bool:
        return bool(self.curve_server_secret)


class AdminConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 5791
    token_file: str = ""
    """File holding the bearer token; used when env ``LYNX_ADMIN_TOKEN`` is unset."""
    health_cache_s: Annotated[float, msgspec.Meta(ge=0.0)] = 2.0
    tls_cert_file: str = ""
    """Optional TLS for the admin API (PEM certificate chain); with ``tls_key_file``. The bearer
    token is required either way."""
    tls_key_file: str = ""
    auth_failures_per_peer: PositiveInt = 20
    """Failed authentications a client address may make per ``auth_window_s``; beyond it the
    admin API answers 429 without checking the token."""
    auth_window_s: PositiveFloat = 10.0
    audit_rejections_per_interval: PositiveInt = 10
    """Audit lines per rejection reason (``unauthenticated``, ``forbidden``, ``throttled``)
    per ``audit_interval_s``; the rest are counted (the next line says how many) and always
    counted in ``lynx_controller_admin_rejections_total``."""
    audit_interval_s: PositiveFloat = 60.0
    header_timeout_s: PositiveFloat = 10.0
    """A connection that has not sent a complete request head this long after connecting (or
    after its previous response) is closed: slow clients cannot hold descriptors."""
    max_connections: PositiveInt = 512
    """Admin connections waiting for a request head at most (also at most half the
    descriptor limit, so HTTP cannot starve the link); a new one evicts the longest-waiting,
    so a request that sends its head at once is always served."""


class StateConfig(_Section, frozen=True):
    dir: str = "./lynx-policy-state"
    """Directory for ``state.json`` (atomic) and ``audit.jsonl`` (append-only)."""


class LoopConfig(_Section, frozen=True):
    interval_s: PositiveFloat = 5.0
    """Seconds between two observe → decide → act ticks while healthy."""
    backoff_s: Annotated[list[PositiveFloat], msgspec.Meta(max_length=MAX_BACKOFF_STEPS)] = \
        msgspec.field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0])
    """Delays after consecutive failed ticks (the last one repeats)."""
    stats_window_s: PositiveFloat = 30.0
    """StepStats older than this do not count towards the live batch-size mix [s]."""


class ObserveConfig(_Section, frozen=True):
    prometheus_url: str = ""
    """Prometheus server (e.g. ``http://prometheus:9090``); empty: scrape runtimes directly."""
    scrape_urls: Annotated[list[Annotated[str, msgspec.Meta(max_length=2048)]],
                           msgspec.Meta(max_length=MAX_SCRAPE_URLS)] = \
        msgspec.field(default_factory=list)
    """Runtime ``/metrics`` URLs scraped without Prometheus (plus registered ``metrics_url``)."""
    metrics_hosts: Annotated[list[Annotated[str, msgspec.Meta(max_length=255)]],
                             msgspec.Meta(max_length=MAX_SCRAPE_URLS)] = \
        msgspec.field(default_factory=list)
    """Hosts a runtime's registered ``metrics_url`` may name besides the address its link
    connected from (ipc:// runtimes: loopback); others are never fetched (no SSRF)."""
    rate_window_s: PositiveFloat = 30.0
    """Window of the latency quantiles [s] (the PromQL ``rate(...[Ns])`` range)."""
    min_tail_samples: Annotated[float, msgspec.Meta(ge=0.0)] = 5.0
    """A ``q`` quantile counts only when the window holds at least this many observations
    above it (samples x (1 - q) >= this; p99 needs 500): the p99 of 100 samples is their
    maximum, one outlier. Fewer: the reading counts as no data (the planners hold). 0: off."""
    max_window_s: PositiveFloat | None = None
    """When ``rate_window_s`` holds too few observations for a quantile, widen the window by
    doubling up to this [s] instead of reading no data (at 2.4 requests/s a 4 s window holds
    ~10 per-request TPOTs, a p90 needs 50). None: never widen."""
    confidence: Annotated[float, msgspec.Meta(ge=0.5, lt=1.0)] = 0.9
    """One-sided confidence of the bounds each reading carries on its quantile (from the
    window's observation count, `lynx_policy.quantiles.confidence_levels`): the model planner
    tightens only on a miss its lower bound confirms and relaxes only on headroom its upper
    bound confirms. 0.5: the bounds are the estimate (act on every reading)."""
    label_selector: str = ""
    """PromQL label matchers added to every query, e.g. ``model_name="olmoe"``."""
    timeout_s: PositiveFloat = 2.0

    def __post_init__(self) -> None:
        if self.max_window_s is not None and self.max_window_s < self.rate_window_s:
            raise ValueError("observe.max_window_s must be at least observe.rate_window_s")


class AdaptiveConfig(_Section, frozen=True):
    buckets: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)]],
                       msgspec.Meta(min_length=1, max_length=MAX_BUCKETS)] = \
        msgspec.field(default_factory=lambda: [
        2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 4096])
    """Batch-size buckets (max decode rows) of the table adaptive mode builds from scratch
    (fine: the model plans each one, and a step uses its own bucket's budget at once)."""
    min_batch: PositiveInt = 8
    """Buckets whose max_batch is below this are never tightened (reduction barely helps), by
    either planner; one that prunes (a table set by hand) is relaxed."""
    step_experts: PositiveInt = 4
    """Budget change per tighten/relax step [experts]."""
    headroom: Annotated[float, msgspec.Meta(gt=0.0, lt=1.0)] = 0.2
    """Relax only when every quantile is below target * (1 - headroom)."""
    tighten_after_ticks: PositiveInt = 2
    """Consecutive violating ticks before a tighten step."""
    relax_after_ticks: PositiveInt = 4
    """Consecutive ticks with headroom before a relax step."""
    min_active_fraction: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.05
    """A bucket is tightened only if it served at least this share of recent decode steps."""
    default_num_experts: PositiveInt = 64
    """Budget meaning "no pruning" while no replica has registered its expert count."""
    use_model: bool = True
    """Plan from the latency model once it is ready (`lynx_policy.plan`); false: reactive
    tighten/relax steps only."""
    margin: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.1
    """Model planning: predicted latency must stay below target * (1 - margin)."""
    max_step_experts: PositiveInt = 16
    """Model planning: a bucket's effective budget moves by at most this per tick [experts]."""
    correction_alpha: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 0.5
    """Weight of the newest observed/predicted ratio in the correction factor's EMA."""
    settle: bool = True
    """Model planning: fit the correction factor against the tables the latency window saw
    (each weighted by its share of the window; a ``tpot`` window counts twice over, a
    request's TPOT being recorded when it ends), not against the table applied now: after a
    change the window still holds the old table's steps. False: the applied table only."""
    arrivals: Literal["open", "closed"] = "open"
    """Ladder planning: how batches answer a faster step. ``open`` (requests arrive on their
    own, as in serving): by Little's law the running batch scales with TPOT, so a table that
    shortens steps also shrinks the batches (`lynx_policy.ladder_plan`). ``closed`` (a fixed
    number of clients, each waiting for its answer): batches stay as observed."""

    def __post_init__(self) -> None:
        if any(b <= a for a, b in itertools.pairwise(self.buckets)):
            raise ValueError("adaptive.buckets must be strictly increasing")
        if self.margin >= self.headroom:
            raise ValueError("adaptive.margin must be below adaptive.headroom (the band "
                             "between them is where a budget holds)")


SloTargets = Annotated[list[SloTarget], msgspec.Meta(max_length=MAX_SLO_TARGETS)]


def _default_slo() -> list[SloTarget]:
    return [SloTarget()]


class ControllerConfig(_Section, frozen=True):
    mode: Mode = "off"
    policy: PolicySpec = msgspec.field(default_factory=PolicySpec)
    slo: SloTargets = msgspec.field(default_factory=_default_slo)
    floor: QualityFloor = msgspec.field(default_factory=QualityFloor)
    link: LinkConfig = msgspec.field(default_factory=LinkConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    loop: LoopConfig = msgspec.field(default_factory=LoopConfig)
    observe: ObserveConfig = msgspec.field(default_factory=ObserveConfig)
    adaptive: AdaptiveConfig = msgspec.field(default_factory=AdaptiveConfig)
    ladder: str = ""
    """Ladder file (``lynx-serve calibrate --ladder``) adaptive mode plans over; empty: uniform
    budgets. One set by ``PUT /v1/ladder`` is persisted in ``state.dir`` and wins."""


def validate_slo(targets: list[SloTarget]) -> list[SloTarget]:
    if not targets:
        raise ValueError("at least one SLO target is required")
    seen = {(t.metric, t.quantile) for t in targets}
    if len(seen) != len(targets):
        raise ValueError("duplicate SLO target (same metric and quantile)")
    return targets


def validate_floor_fits(policy: PolicySpec, floor: QualityFloor) -> None:
    """Budgets of a ``budget`` policy may not be below the quality floor."""
    if policy.name != "budget":
        return
    for i, bucket in enumerate(policy.budgets):
        if bucket.per_layer is not None:
            for layer, value in enumerate(bucket.per_layer):
                if value < floor.for_layer(layer):
                    raise PolicyError(f"budgets[{i}].per_layer[{layer}]={value} is below the "
                                      f"quality floor {floor.for_layer(layer)}")
        elif bucket.all_layers is not None and bucket.all_layers < floor.highest():
            raise PolicyError(f"budgets[{i}].all_layers={bucket.all_layers} is below the "
                              f"quality floor {floor.highest()}")


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"env override: {'.'.join(path)} crosses non-table key {key!r}")
        node = child
    node[path[-1]] = value


def apply_env_overrides(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if not all(path):
            raise ConfigError(f"env override {name}: empty key segment")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        _set_path(data, path, value)
    return data


def load_config(path: str | Path | None, environ: dict[str, str] | None = None
                ) -> ControllerConfig:
    """Read, override from env, and validate; raises `ConfigError` (one line) on any problem."""
    data: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        file = Path(path)
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config {where}: cannot read: {exc.strerror}") from None
        if file.suffix not in (".toml", ".json"):
            raise ConfigError(f"config {where}: unknown extension, use .toml or .json")
        try:
            data = tomllib.loads(raw.decode()) if file.suffix == ".toml" else json.loads(raw)
        except ValueError as exc:  # TOMLDecodeError, JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"config {where}: not valid {file.suffix[1:]}: "
                              f"{str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config {where}: top level must be a table/object")
    data = apply_env_overrides(data, dict(os.environ if environ is None else environ))
    try:
        config = msgspec.convert(data, ControllerConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {where}: {exc}".replace("\n", " ")) from None
    try:
        validate_endpoint(config.link.bind)
        link = config.link
        if bool(config.admin.tls_cert_file) != bool(config.admin.tls_key_file):
            raise ValueError("admin.tls_cert_file and admin.tls_key_file go together")
        if bool(link.curve_server_secret) != bool(link.curve_clients_dir):
            raise ValueError("link.curve_server_secret and link.curve_clients_dir go together")
        if link.bind.startswith("tcp://") and not (link.curve or link.plaintext_tcp):
            raise ValueError("a tcp:// link needs CURVE keys (link.curve_server_secret, "
                             "link.curve_clients_dir) or an explicit link.plaintext_tcp = true")
        validate_policy(config.policy)
        validate_slo(config.slo)
        validate_floor_fits(config.policy, config.floor)
        if config.ladder:
            load_ladder(config.ladder)  # LadderError: one line naming the file
        if not config.loop.backoff_s:
            raise ValueError("loop.backoff_s needs at least one delay")
        if config.observe.prometheus_url and not config.observe.prometheus_url.startswith(
                ("http://", "https://")):
            raise ValueError("observe.prometheus_url must start with http:// or https://")
    except (EndpointError, PolicyError, ValueError) as exc:
        raise ConfigError(f"config {where}: {exc}") from None
    return config


def read_admin_token(config: ControllerConfig, environ: dict[str, str] | None = None) -> str:
    """The admin bearer token from env ``LYNX_ADMIN_TOKEN`` or ``admin.token_file``."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV, "")
    source = TOKEN_ENV
    if not token and config.admin.token_file:
        source = config.admin.token_file
        try:
            token = Path(config.admin.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"admin.token_file: cannot read: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"no admin token: set {TOKEN_ENV} or admin.token_file")
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"admin token from {source} must be >= {MIN_TOKEN_CHARS} characters "
                          "without whitespace")
    return token

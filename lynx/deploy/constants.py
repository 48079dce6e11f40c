"""Every name, port and path the deployment files share, in one place.

The controller-side values mirror `lynx_policy.config` (defaults of ``[link]``/``[admin]``) and
`lynx_policy.metrics`; `test/test_deploy_static.py` checks they still agree, so a rename on the
controller side fails a test instead of silently breaking a dashboard.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"

# --- pinned versions -------------------------------------------------------------------------
SGLANG_VERSION = "0.5.23"
SGLANG_IMAGE = f"lmsysorg/sglang:v{SGLANG_VERSION}"
"""Upstream SGLang image (CUDA 13 build; 0.5.19-cu129 was the last CUDA 12 tag)."""
SGLANG_ROUTER_VERSION = "0.3.2"
PYTHON_IMAGE = "python:3.11.11-slim-bookworm"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.4"
GRAFANA_IMAGE = "grafana/grafana:11.6.0"
SMOKE_PROMETHEUS_IMAGE = "lynx-smoke-prometheus:local"
"""Built by ``make compose-smoke`` from ``docker/smoke/prometheus.Dockerfile`` (test only)."""

# --- runtime (SGLang + plugin) ---------------------------------------------------------------
RUNTIME_PORT = 30000
RUNTIME_HEALTH_PATH = "/health"
RUNTIME_JOB = "lynx-runtime"
DEFAULT_REPLICAS = 2
"""Replicas of the committed GPU stack (``python -m lynx.deploy generate --replicas N``)."""
CPU_REPLICAS = 1
"""Replicas of the committed laptop stack (each SGLang CPU process takes ~2-3 GB of RAM)."""
CPU_REFERENCE_MODEL = "mixtral-mini"
"""Committed reference model the laptop (CPU) stack serves (``models/mixtral-mini``)."""
CPU_ENGINE_FLAGS: tuple[str, ...] = (
    "--device", "cpu", "--attention-backend", "torch_native", "--max-total-tokens", "4096",
    "--sleep-on-idle",
)
"""Same flags as `lynx.serving.server.CPU_DEFAULT_FLAGS` (``--enable-metrics`` is always on)."""

# --- router (sglang-router) ------------------------------------------------------------------
ROUTER_PORT = 30080
ROUTER_METRICS_PORT = 29000
ROUTER_JOB = "sglang-router"

# --- controller (lynx-policy) ----------------------------------------------------------------
CONTROLLER_LINK_PORT = 5790
CONTROLLER_ADMIN_PORT = 5791
CONTROLLER_HEALTH_PATH = "/healthz"
CONTROLLER_METRICS_PATH = "/metrics"
CONTROLLER_JOB = "lynx-controller"
CONTROLLER_CONFIG_IN_IMAGE = "/etc/lynx-policy/controller.toml"
CONTROLLER_STATE_DIR = "/var/lib/lynx-policy"
ADMIN_TOKEN_SECRET = "lynx_admin_token"
"""Compose secret name; the controller reads it from ``/run/secrets/<name>``."""
ADMIN_TOKEN_FILE_IN_CONTAINER = f"/run/secrets/{ADMIN_TOKEN_SECRET}"
LINK_KEYS_DIR = "./secrets/link"
"""CURVE keys of the controller link (``make link-keys``), relative to ``docker/``."""
LINK_SERVER_SECRET = "lynx_link_controller"  # the controller's key pair (controller only)
LINK_SERVER_PUBLIC = "lynx_link_controller_public"  # its public key (every runtime)
LINK_CLIENTS_IN_CONTAINER = "/etc/lynx-policy/clients"
"""Allowed runtime public keys (``*.key``), bind-mounted read-only; re-read on change."""


def link_runtime_secret(index: int) -> str:
    """Compose secret name of runtime ``index``'s CURVE key pair."""
    return f"lynx_link_runtime_{index}"

# --- Prometheus / Grafana --------------------------------------------------------------------
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
DATASOURCE_UID = "lynx-prometheus"
"""The provisioned datasource's uid: written ONLY into the Grafana provisioning file; the
dashboard selects its datasource through the ``$datasource`` template variable."""
DASHBOARD_UID = "lynx-overview"
SCRAPE_INTERVAL = "5s"

# --- SLO defaults (controller.toml in the image; also the alert's fallback threshold) --------
ITL_SLO_QUANTILE = 0.99
ITL_SLO_MS = 100.0
TTFT_SLO_QUANTILE = 0.99
TTFT_SLO_MS = 2000.0
CPU_ITL_SLO_MS = 500.0
"""The laptop stack's ITL target: a 2-core CPU decodes far slower than a GPU."""
CPU_TTFT_SLO_MS = 5000.0
SLO_BREACH_FOR = "5m"
CONTROLLER_STALE_FOR = "1m"
TOP1_KEPT_FOR = "5m"

# --- metric names the dashboard and rules rely on (exporters: see README "Metrics") ---------
RUNTIME_METRICS = (
    "lynx_experts_kept_mean", "lynx_experts_stock_union_mean", "lynx_experts_kept_total",
    "lynx_experts_stock_union_total", "lynx_routing_mass_kept_total", "lynx_routing_mass_total",
    "lynx_top1_kept_rows_total", "lynx_pruned_rows_total", "lynx_rerouted_rows_total",
    "lynx_steps_total",
    "lynx_step_duration_seconds_bucket", "lynx_policy_version", "lynx_policy_active",
    "lynx_controller_connected",
)
EP_RUNTIME_METRICS = (
    "lynx_ep_rank_experts_max", "lynx_ep_rank_experts_mean", "lynx_ep_balancedness",
    "lynx_ep_rank_pairs_max", "lynx_ep_rank_pairs_mean", "lynx_moe_expert_seconds_total",
)
"""Runtime series of an EP deployment (``--ep-size`` > 1, ``LYNX_TIME_MOE=1``): the
dashboard's ``ep`` panels."""
CONTROLLER_METRICS = (
    "lynx_controller_mode", "lynx_controller_policy_version", "lynx_controller_decisions_total",
    "lynx_controller_unfixable_holds_total",
    "lynx_controller_slo_attainment_ratio", "lynx_controller_replicas_connected",
    "lynx_controller_messages_received_total", "lynx_controller_messages_rejected_total",
    "lynx_controller_loop_degraded",
    "lynx_controller_observed_latency_seconds", "lynx_controller_slo_target_seconds",
    "lynx_controller_budget_experts", "lynx_controller_step_latency_observed_seconds",
    "lynx_controller_step_latency_predicted_seconds", "lynx_controller_model_ready",
    "lynx_controller_model_error_ratio", "lynx_controller_latency_correction",
    "lynx_controller_expected_mass_kept_ratio", "lynx_controller_expected_quality_cost",
)
SGLANG_METRICS = (
    "sglang:inter_token_latency_seconds_bucket", "sglang:time_to_first_token_seconds_bucket",
    "sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:generation_tokens_total",
)
ROUTER_METRICS = ("smg_http_responses_total",)
"""sglang-router 0.3.x exports ``smg_*`` on its ``--prometheus-port``."""

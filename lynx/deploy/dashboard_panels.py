"""The Lynx Grafana dashboard's panels as data (`lynx.deploy.dashboard` builds the JSON): each
panel's PromQL is also what the tests run against live stacks. A panel's ``topology`` says
which stack has its series: ``base`` (every stack) or ``ep`` (served with ``--ep-size`` > 1
and ``LYNX_TIME_MOE=1``; empty elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lynx.deploy import constants as c
from lynx.deploy.promql import either_spelling

Topology = Literal["base", "ep"]

R = "$__rate_interval"
SEL = 'instance=~"$replica"'
"""Label matcher of the replica picker (runtime series)."""


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat"] = "timeseries"
    width: int = 12
    min_value: float | None = None
    max_value: float | None = None
    bars: bool = False
    topology: Topology = "base"
    """The stack whose series this panel reads (module docstring)."""


@dataclass(frozen=True)
class RowSpec:
    title: str
    panels: tuple[PanelSpec, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str) -> Query:
    return Query(expr, legend)


def _ratio(num: str, den: str, by: str) -> str:
    return (f"sum by ({by}) (rate({num}{{{SEL}}}[{R}])) "
            f"/ sum by ({by}) (rate({den}{{{SEL}}}[{R}]))")


def _quantile(q: float, hist: str, by: str = "instance", sel: str = SEL) -> str:
    series = (either_spelling(f"{hist}_bucket", sel) if ":" in hist
              else f"{hist}_bucket{{{sel}}}")
    return f"histogram_quantile({q:g}, sum by (le, {by}) (rate({series}[{R}])))"


def _sg(name: str) -> str:
    """An SGLang series of the selected replicas, under either stored spelling."""
    return either_spelling(name, SEL)


ITL, TTFT = "sglang:inter_token_latency_seconds", "sglang:time_to_first_token_seconds"

ROWS: tuple[RowSpec, ...] = (
    RowSpec("Policy and controller", (
        PanelSpec("Controller mode", "The controller's mode: off (stock), static (the stored "
                  "policy) or adaptive (SLO-driven budget).",
                  (_q("lynx_controller_mode == 1", "{{mode}}"),), kind="stat", width=6),
        PanelSpec("Policy version: controller vs replicas", "Version the controller sends and "
                  "version each replica has applied; a replica that lags behind for more than a "
                  "few seconds is not receiving updates.",
                  (_q("lynx_controller_policy_version", "controller"),
                   _q(f"lynx_policy_version{{{SEL}}}", "{{instance}}")), width=9),
        PanelSpec("Applied policy per replica", "1 for the policy each replica applies now "
                  "(off, budget, affinity, piggyback); the safe policy shows here while the "
                  "controller is stale.",
                  (_q(f"lynx_policy_active{{{SEL}}} == 1", "{{instance}}: {{policy}}"),),
                  kind="stat", width=9),
        PanelSpec("Controller link", "Per replica, 1 while the controller is heard from "
                  "(lynx_controller_connected); the controller's count of connected replicas; "
                  "and whether Prometheus reaches the controller (up).",
                  (_q(f"lynx_controller_connected{{{SEL}}}", "{{instance}} connected"),
                   _q("lynx_controller_replicas_connected", "replicas connected (controller)"),
                   _q(f'up{{job="{c.CONTROLLER_JOB}"}}', "controller up")), width=12),
        PanelSpec("Controller decisions", "Control-loop decisions per interval by direction: "
                  "tighten (SLO violated, fewer experts), relax (headroom, more experts), hold; "
                  "and the holds that leave a miss pruning cannot fix, by cause "
                  "(cannot_close_gap: even the lowest rung is predicted above the target; "
                  "prefill_stalls: the misses come from prefill/mixed steps).",
                  (_q(f"sum by (direction) (increase(lynx_controller_decisions_total[{R}]))",
                      "{{direction}}"),
                   _q(f"sum by (cause) (increase(lynx_controller_unfixable_holds_total[{R}]))",
                      "hold, pruning cannot fix: {{cause}}")), bars=True, width=12),
        PanelSpec("Budget per batch-size bucket", "Mean experts per layer the current policy "
                  "allows, per batch-size bucket (max decode rows); adaptive mode moves these.",
                  (_q("lynx_controller_budget_experts", "batch <= {{max_batch}}"),), width=12),
        PanelSpec("Controller messages and loop", "Runtime messages the controller accepts "
                  "(by type) and rejects (by reason), per second; and the loop's degraded flag.",
                  (_q(f"sum by (type) (rate(lynx_controller_messages_received_total[{R}]))",
                      "received {{type}}"),
                   _q(f"sum by (reason) (rate(lynx_controller_messages_rejected_total[{R}]))",
                      "rejected {{reason}}"),
                   _q("lynx_controller_loop_degraded", "loop degraded")), width=12),
    )),
    RowSpec("Expert reduction", (
        PanelSpec("Experts kept vs stock union (per replica and layer)", "Mean experts a "
                  "pruned decode step reads per layer (kept) against the experts the stock "
                  "router would have read (the union of the batch's top-k), last export window.",
                  (_q(f"lynx_experts_kept_mean{{{SEL}}}", "{{instance}} L{{layer}} kept"),
                   _q(f"lynx_experts_stock_union_mean{{{SEL}}}",
                      "{{instance}} L{{layer}} stock union")), width=12),
        PanelSpec("Kept / stock union ratio", "Share of the stock expert union that is still "
                  "read, from the counters: per layer, and all layers together per replica. "
                  "1 - this is the expert-weight traffic Lynx saves.",
                  (_q(_ratio("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                             "instance, layer"), "{{instance}} L{{layer}}"),
                   _q(_ratio("lynx_experts_kept_total", "lynx_experts_stock_union_total",
                             "instance"), "{{instance}} all layers")),
                  unit="percentunit", min_value=0, max_value=1, width=12),
        PanelSpec("Routing mass kept", "Share of the stock top-k routing weight of pruned rows "
                  "that lands on kept experts (1 = nothing lost), the share of pruned rows "
                  "that kept their top-1 expert (must be exactly 1), and the share of pruned "
                  "rows Lynx rerouted (the only rows whose routing differs from SGLang's).",
                  (_q(_ratio("lynx_routing_mass_kept_total", "lynx_routing_mass_total",
                             "instance"), "{{instance}} routing mass kept"),
                   _q(_ratio("lynx_top1_kept_rows_total", "lynx_pruned_rows_total", "instance"),
                      "{{instance}} top-1 kept"),
                   _q(_ratio("lynx_rerouted_rows_total", "lynx_pruned_rows_total", "instance"),
                      "{{instance}} rerouted")),
                  unit="percentunit", max_value=1, width=12),
        PanelSpec("Steps by mode", "Forward steps per second by mode (decode, prefill, mixed) "
                  "and whether Lynx pruned them.",
                  (_q(f"sum by (instance, mode, pruned) (rate(lynx_steps_total{{{SEL}}}[{R}]))",
                      "{{instance}} {{mode}} pruned={{pruned}}"),), unit="ops", width=12),
    )),
    RowSpec("Latency and SLO", (
        PanelSpec("Inter-token latency P50/P99 vs SLO", "P50 and P99 inter-token latency per "
                  "replica from SGLang's histogram, with the controller's ITL target (the SLO "
                  "line). The LynxItlSloBreach alert fires when P99 stays above it.",
                  (_q(_quantile(0.5, ITL), "{{instance}} p50"),
                   _q(_quantile(0.99, ITL), "{{instance}} p99"),
                   _q('lynx_controller_slo_target_seconds{metric="itl"}', "SLO p{{quantile}}")),
                  unit="s", width=12),
        PanelSpec("Time to first token P50/P99 vs SLO", "P50 and P99 time to first token per "
                  "replica, with the controller's TTFT target. Lynx never prunes prefill, so "
                  "TTFT mostly reflects queueing and load.",
                  (_q(_quantile(0.5, TTFT), "{{instance}} p50"),
                   _q(_quantile(0.99, TTFT), "{{instance}} p99"),
                   _q('lynx_controller_slo_target_seconds{metric="ttft"}',
                      "SLO p{{quantile}}")), unit="s", width=12),
        PanelSpec("Controller's observed latency and SLO attainment", "The latency quantiles "
                  "the controller itself acts on (through Prometheus or scrapes) and the share "
                  "of recent ticks where every SLO held.",
                  (_q("lynx_controller_observed_latency_seconds", "observed {{metric}} "
                      "p{{quantile}}"),
                   _q("lynx_controller_slo_attainment_ratio", "SLO attainment")), width=12),
        PanelSpec("Lynx step duration P50/P99", "Host-side wall time of a forward step by mode, "
                  "pruned or not (includes Lynx's selection).",
                  (_q(_quantile(0.5, "lynx_step_duration_seconds", "instance, mode"),
                      "{{instance}} {{mode}} p50"),
                   _q(_quantile(0.99, "lynx_step_duration_seconds", "instance, mode"),
                      "{{instance}} {{mode}} p99")), unit="s", width=12),
    )),
    RowSpec("Latency model (controller v2)", (
        PanelSpec("Decode step latency: model vs observed", "Mean pure decode step latency "
                  "the replicas reported per runtime batch-size bucket, and what the "
                  "controller's latency model t = a + b*B + c*m predicts for the same steps. "
                  "Predicted is empty until the model is ready (run lynx-policy profile).",
                  (_q("lynx_controller_step_latency_observed_seconds",
                      "observed, batch <= {{max_batch}}"),
                   _q("lynx_controller_step_latency_predicted_seconds",
                      "predicted, batch <= {{max_batch}}")), unit="s", width=12),
        PanelSpec("Model state and quality cost", "1 while the model plans the budgets (0: "
                  "reactive rules); fit error (RMSE / mean step); correction factor (observed "
                  "client quantile / predicted step quantile); expected routing mass kept by "
                  "the applied table over the recent batch mix (1: nothing pruned); with a "
                  "ladder, the expected held-out perplexity rise of the rungs applied.",
                  (_q("lynx_controller_model_ready", "model ready"),
                   _q("lynx_controller_model_error_ratio", "fit error"),
                   _q("lynx_controller_latency_correction", "correction {{metric}} "
                      "p{{quantile}}"),
                   _q("lynx_controller_expected_mass_kept_ratio", "expected mass kept"),
                   _q("lynx_controller_expected_quality_cost", "expected {{kind}}")),
                  width=12),
    )),
    RowSpec("Load", (
        PanelSpec("Batch size (running and queued requests)", "Requests in the running decode "
                  "batch and in the queue per replica (SGLang refreshes these gauges every "
                  "--decode-log-interval steps). Lynx prunes more as this grows.",
                  (_q(f"max by (instance) ({_sg('sglang:num_running_reqs')})",
                      "{{instance}} running"),
                   _q(f"max by (instance) ({_sg('sglang:num_queue_reqs')})",
                      "{{instance}} queued")), width=8),
        PanelSpec("Throughput (generated tokens/s)", "Output tokens per second per replica and "
                  "in total.",
                  (_q(f"sum by (instance) (rate({_sg('sglang:generation_tokens_total')}[{R}]))",
                      "{{instance}}"),
                   _q(f"sum(rate({_sg('sglang:generation_tokens_total')}[{R}]))", "total")),
                  unit="short", width=8),
        PanelSpec("Router responses", "Responses per second of the sglang-router in front of "
                  "the replicas, by HTTP status (5xx: no healthy replica or upstream errors).",
                  (_q(f"sum by (status_code) (rate(smg_http_responses_total[{R}]))",
                      "{{status_code}}"),), unit="reqps", width=8),
    )),
    RowSpec("Expert parallelism", (
        PanelSpec("Experts per EP rank: busiest vs mean", "Experts the busiest EP rank and "
                  "the mean rank read per MoE layer-step, for the batch's stock top-k and for "
                  "what Lynx ran (LYNX_EP_BALANCE=1 spends each budget per rank); an MoE step "
                  "waits for the busiest rank. Empty unless served with --ep-size > 1.",
                  (_q(f"lynx_ep_rank_experts_max{{{SEL}}}", "{{instance}} busiest {{routing}}"),
                   _q(f"lynx_ep_rank_experts_mean{{{SEL}}}", "{{instance}} mean {{routing}}"),
                   _q(f"lynx_ep_balancedness{{{SEL}}}", "{{instance}} balancedness "
                      "{{routing}}")), width=8, topology="ep"),
        PanelSpec("Token pairs per EP rank: busiest vs mean", "(token, expert) pairs the "
                  "busiest EP rank and the mean rank compute per MoE layer-step, stock top-k "
                  "vs what Lynx ran: rerouted choices land on kept experts, so pruning can "
                  "move compute between ranks. Empty unless served with --ep-size > 1.",
                  (_q(f"lynx_ep_rank_pairs_max{{{SEL}}}", "{{instance}} busiest {{routing}}"),
                   _q(f"lynx_ep_rank_pairs_mean{{{SEL}}}", "{{instance}} mean {{routing}}")),
                  unit="short", width=8, topology="ep"),
        PanelSpec("Expert time per rank", "Seconds per second each rank spends in its own "
                  "experts during decode steps, before the combine (LYNX_TIME_MOE=1): the "
                  "slowest rank sets the MoE step. Empty unless LYNX_TIME_MOE=1.",
                  (_q("sum by (instance, tp_rank) (rate(lynx_moe_expert_seconds_total"
                      f'{{{SEL}, mode="decode"}}[{R}]))', "{{instance}} rank {{tp_rank}}"),),
                  unit="percentunit", width=8, topology="ep"),
    )),
)

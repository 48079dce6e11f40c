"""summary.json (the issue's schema, exactly), the frontier plot and RESULTS.md from the three
benchmarks' JSON outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmark.common import PUBLISHED, markdown_table, rounded

MOE_KEYS = ("shape", "E", "k", "batch", "policy", "knob", "stock_ms", "lynx_ms", "speedup",
            "experts_stock", "experts_kept", "bound", "fraction_of_bound", "overhead_share",
            "default")
E2E_KEYS = ("model", "concurrency", "policy", "knob", "tpot_stock_ms", "tpot_lynx_ms",
            "tpot_ratio", "exact_match_stock", "exact_match_lynx", "ppl_stock", "ppl_lynx",
            "top1_kept_rate", "default", "moe_share", "amdahl_bound")


def summary(machine: str, moe: dict[str, Any], e2e: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": machine,
        "moe_layer": [{k: row[k] for k in MOE_KEYS} for row in moe["rows"]],
        "e2e": [{k: row[k] for k in E2E_KEYS} for row in e2e["rows"]],
    }


def frontier_points(e2e: dict[str, Any], concurrency: int) -> list[dict[str, Any]]:
    points = []
    for row in e2e["rows"]:
        if row["concurrency"] != concurrency or row["policy"] == "off":
            continue
        points.append({"model": row["model"], "label": f"{row['policy']}:{row['knob']}",
                       "policy": row["policy"], "speedup": row["tpot_ratio"],
                       "throughput_ratio": row.get("throughput_ratio"),
                       "em_delta_points": 100 * (row["exact_match_lynx"]
                                                 - row["exact_match_stock"]),
                       "ppl_rise": row["ppl_lynx"] / row["ppl_stock"] - 1,
                       "default": row["default"]})
    return points


def plot_frontier(e2e: dict[str, Any], concurrency: int, path: Path) -> Path:
    """Speedup (x) vs exact-match delta (top) and perplexity rise (bottom), per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier_points(e2e, concurrency)
    models = sorted({p["model"] for p in points}) or ["(no data)"]
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8.5), squeeze=False)
    markers = {"budget": "o", "affinity": "s", "piggyback": "^", "coverage": "D"}
    metrics = (("em_delta_points", f"exact-match delta at batch {concurrency} [points]", 1.0),
               ("ppl_rise", f"code perplexity rise at batch {concurrency} [%]", 100.0))
    for col, model in enumerate(models):
        mine = [p for p in points if p["model"] == model]
        for row, (key, label, scale) in enumerate(metrics):
            ax = axes[row][col]
            for policy, marker in markers.items():
                sel = [p for p in mine if p["policy"] == policy]
                ax.scatter([p["speedup"] for p in sel], [scale * p[key] for p in sel],
                           marker=marker, s=45, label=policy)
                for p in sel:
                    ax.annotate(p["label"].split(":")[1], (p["speedup"], scale * p[key]),
                                fontsize=7, xytext=(3, 3), textcoords="offset points")
            for p in mine:
                if p["default"]:
                    ax.scatter([p["speedup"]], [scale * p[key]], marker="*", s=300,
                               facecolors="none", edgecolors="red", label="default")
            ax.axvline(1.0, color="grey", lw=0.8)
            ax.axvline(PUBLISHED["latency_v1"], color="C3", ls="--", lw=1,
                       label="Lynx v1: 1.55x latency")
            ax.axvline(PUBLISHED["throughput_v3"], color="C4", ls=":", lw=1.2,
                       label="Lynx v3: 1.30x throughput")
            if key == "em_delta_points":
                ax.axhline(-PUBLISHED["max_loss_points"], color="C2", ls="--", lw=1,
                           label="published: < 1 point loss")
                ax.set_ylim(min([-1.5] + [p[key] - 0.3 for p in mine]), 0.5)
            else:
                ax.axhline(2.0, color="C2", ls="--", lw=1, label="target: <= 2% ppl rise")
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set_xlim(min([0.75] + [p["speedup"] - 0.05 for p in mine]),
                        max([1.65] + [p["speedup"] + 0.05 for p in mine]))
            ax.set_xlabel(f"TPOT speedup vs stock at concurrency {concurrency} (x)")
            ax.set_ylabel(label)
            ax.set_title(model)
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Speedup vs accuracy per policy (SGLang CPU server, widened reference models)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _moe_tables(moe: dict[str, Any]) -> str:
    parts = []
    header = ["shape", "B", "stock ms", "Lynx ms", "speedup", "experts stock→kept", "bound",
              "speedup/bound", "gain frac.", "overhead"]
    rows = [r for r in moe["rows"] if r["default"]]
    parts.append("Default policy of the run (budget m = max(2k, E/2) until 2026-12-07, "
                 "max(2k + 1, E/2) since; no pruning below 4 rows):\n")
    parts.append(markdown_table(header, [
        [r["shape"], r["batch"], r["stock_ms"], r["lynx_ms"], r["speedup"],
         f"{r['experts_stock']:.1f}→{r['experts_kept']:.1f}", r["bound"],
         r["fraction_of_bound"], "-" if r["gain_fraction"] is None else r["gain_fraction"],
         f"{100 * r['overhead_share']:.1f}%"] for r in rows]))
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in moe["rows"]:
        key = (r["shape"], r["batch"])
        if r["batch"] >= 16 and (key not in best or r["speedup"] > best[key]["speedup"]):
            best[key] = r
    parts.append("\n\nFastest policy/knob per shape at B >= 16:\n")
    parts.append(markdown_table(["shape", "B", "policy:knob", "speedup", "bound",
                                 "speedup/bound", "overhead"], [
        [r["shape"], r["batch"], f"{r['policy']}:{r['knob']}", r["speedup"], r["bound"],
         r["fraction_of_bound"], f"{100 * r['overhead_share']:.1f}%"] for r in best.values()]))
    return "".join(parts)


def _e2e_tables(e2e: dict[str, Any]) -> str:
    parts = []
    for model in e2e["models"]:
        rows = [r for r in e2e["rows"] if r["model"] == model["model"]]
        parts.append(f"\n**{model['model']}** (E={model['E']}, k={model['k']}; latency on "
                     f"`{model['served']}`, default {model['default']}):\n\n")
        parts.append(markdown_table(
            ["policy:knob", "C", "TPOT stock", "TPOT Lynx", "ratio", "TPOT off", "off/Lynx",
             "MoE share f", "MoE speedup S", "Amdahl bound", "(off/Lynx)/bound",
             "weights bound", "P99 TPOT s/L",
             "ITL med s/L", "ITL P99 s/L", "tok/s s/L", "CPU ms/tok s/L", "EM s/L (B)",
             "ppl s/L (B)", "agree", "top-1 kept"],
            [[f"{r['policy']}:{r['knob']}" + (" *" if r["default"] else ""), r["concurrency"],
              r["tpot_stock_ms"], r["tpot_lynx_ms"], r["tpot_ratio"], r.get("tpot_off_ms"),
              r.get("tpot_ratio_off"), r.get("moe_share"),
              r.get("moe_speedup"), r.get("amdahl_bound"), r.get("fraction_of_amdahl"),
              r.get("weights_bound"),
              f"{r['tpot_p99_stock_ms']:.0f}/{r['tpot_p99_lynx_ms']:.0f}",
              f"{r['itl_median_stock_ms']:.0f}/{r['itl_median_lynx_ms']:.0f}",
              f"{r['itl_p99_stock_ms']:.0f}/{r['itl_p99_lynx_ms']:.0f}",
              f"{r['throughput_stock_tok_s']:.0f}/{r['throughput_lynx_tok_s']:.0f}",
              f"{r['cpu_ms_per_token_stock']:.2f}/{r['cpu_ms_per_token_lynx']:.2f}",
              f"{r['exact_match_stock']:.3f}/{r['exact_match_lynx']:.3f} ({r['accuracy_batch']})",
              f"{r['ppl_stock']:.2f}/{r['ppl_lynx']:.2f} ({r['ppl_batch']})",
              r["next_token_agreement"], r["top1_kept_rate"]] for r in rows]))
        parts.append("\n\nAccuracy by batch size (exact match through the server; code "
                     "perplexity with the router hook):\n\n")
        parts.append(markdown_table(["policy:knob", "B", "EM stock", "EM Lynx"], [
            [a["variant"], a["batch"], a["exact_match_stock"], a["exact_match_lynx"]]
            for a in model["accuracy"]]))
        parts.append("\n\n")
        parts.append(markdown_table(["policy:knob", "B", "ppl stock", "ppl Lynx", "rise",
                                     "next-token agreement", "top-1 kept (hook)"], [
            [c["variant"], c["batch"], c["ppl_stock"], c["ppl_lynx"],
             f"{100 * c['ppl_rise']:.2f}%", c["next_token_agreement"],
             c["hook_top1_kept_rate"]] for c in model["code"]]))
        parts.append("\n")
    return "".join(parts)


def targets(moe: dict[str, Any], e2e: dict[str, Any], frontier_c: int) -> list[list[Any]]:
    """The issue's targets next to the measured values."""
    fine = [r for r in moe["rows"] if r.get("fine_grained") and 16 <= r["batch"] <= 64
            and r["dtype"] == "fp32" and r["bound"] >= 1.02
            and ("/" in r["shape"] or "wide" in r["shape"])]  # experts dominate the layer
    best_frac = max((r["fraction_of_bound"] for r in fine), default=float("nan"))
    dflt = [r["fraction_of_bound"] for r in fine if r["default"]]
    overhead = [r["overhead_share"] for r in moe["rows"] if r["default"] and r["batch"] >= 4]
    big = [r["overhead_share"] for r in moe["rows"] if r["default"] and r["batch"] >= 16
           and r.get("fine_grained") and r["dtype"] == "fp32"
           and ("/" in r["shape"] or "128" in r["shape"])]  # production-ratio shapes
    ok_points = [p for p in frontier_points(e2e, frontier_c) if p["em_delta_points"] >= -1
                 and p["ppl_rise"] <= 0.02]
    best_e2e = max(ok_points, key=lambda p: p["speedup"], default=None)
    amdahl = [r for r in e2e["rows"] if r["default"] and r["concurrency"] == frontier_c
              and r.get("fraction_of_amdahl") is not None]
    return [
        ["MoE layer: >= 90% of bound, B=16..64, fine-grained (widened/production, fp32)",
         f"default: {min(dflt, default=float('nan')):.2f}..{max(dflt, default=float('nan')):.2f}"
         f", best policy {best_frac:.2f}"],
        ["Selection overhead <= 2% of layer time (default, B >= 16, production-ratio shapes)",
         f"all shapes, B >= 4: {100 * min(overhead, default=float('nan')):.1f}%.."
         f"{100 * max(overhead, default=float('nan')):.1f}%; production-ratio shapes (fp32, "
         "B >= 16) "
         f"{100 * min(big, default=float('nan')):.1f}%.."
         f"{100 * max(big, default=float('nan')):.1f}%"],
        [f"E2E TPOT ratio >= 0.9 of its Amdahl bound (default, C={frontier_c})",
         "; ".join(f"{r['model']}: {r['tpot_ratio_off']:.2f}x (Lynx vs off, same server) of "
                   f"bound {r['amdahl_bound']:.2f}x = {r['fraction_of_amdahl']:.2f} (f "
                   f"{r['moe_share']:.2f}, MoE x{r['moe_speedup']:.2f})" for r in amdahl)
         or "not measured"],
        [f">= 2.0x TPOT at C={frontier_c}, <= 1 pt EM loss, <= 2% ppl rise",
         "none qualifies" if best_e2e is None else
         f"{best_e2e['speedup']:.2f}x ({best_e2e['model']} {best_e2e['label']}, "
         f"EM {best_e2e['em_delta_points']:+.1f} pt, ppl {100 * best_e2e['ppl_rise']:+.2f}%)"],
    ]


def rounded_or(value: Any, digits: int = 3) -> Any:
    return rounded(value, digits) if isinstance(value, float) else value

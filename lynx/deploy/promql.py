"""Small PromQL helpers: metric names an expression reads, Grafana variable substitution.

Not a PromQL parser: `promtool` checks syntax (see the tests). This only has to find the metric
names in the expressions this package writes, which it does by removing string literals, label
matchers, range/offset brackets and grouping clauses, then keeping identifiers that are not
functions, aggregations or keywords.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan",
})
SYNTHETIC_METRICS = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
"""Series Prometheus makes itself (not found on any /metrics page)."""

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")

GRAFANA_DEFAULTS: dict[str, str] = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (Prometheus' synthetic ``up`` included)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub("", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in KEYWORDS:
            continue
        names.add(name)
    return names


def all_metric_names(exprs: Iterable[str], *, synthetic: bool = False) -> set[str]:
    names: set[str] = set().union(*(metric_names(e) for e in exprs))
    return names if synthetic else names - SYNTHETIC_METRICS


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replace Grafana's ``$__*`` and the dashboard's own ``$var`` by plain PromQL values."""
    values = {**GRAFANA_DEFAULTS, **(variables or {})}
    for name in sorted(values, key=len, reverse=True):  # $__rate_interval before $__range
        expr = expr.replace(name, values[name])
    if "$" in expr:
        raise ValueError(f"unsubstituted Grafana variable in {expr!r}")
    return expr

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

_EITHER_SPELLING = re.compile(r'__name__=~"([A-Za-z_]\w*)\[:_\](\w+)"')
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


def either_spelling(name: str, matchers: str = "") -> str:
    """Selector of a ``prefix:rest`` metric under both of its stored names.

    prometheus_client >= 0.22 answers Prometheus 2.x's OpenMetrics scrape with
    ``escaping=underscores``: ``sglang:x`` is stored as ``sglang_x`` there, and as ``sglang:x`` by
    Prometheus 3 or a text-format scrape. Only one spelling exists in a given server, so
    aggregating over the regex name loses nothing and double-counts nothing.
    """
    prefix, sep, rest = name.partition(":")
    if not sep:
        raise ValueError(f"{name!r} has no ':'")
    extra = f", {matchers}" if matchers else ""
    return f'{{__name__=~"{prefix}[:_]{rest}"{extra}}}'


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (Prometheus' synthetic ``up`` included); a
    `either_spelling` selector counts as its canonical ``prefix:rest`` name."""
    names = {f"{m.group(1)}:{m.group(2)}" for m in _EITHER_SPELLING.finditer(expr)}
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _BRACKETS.sub("", text)
    text = _GROUPING.sub("", text)
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

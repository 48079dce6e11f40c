"""Read Prometheus text exposition (SGLang's /metrics) into plain numbers."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """All samples named ``name`` (exact sample name, e.g. ``foo_total`` or ``foo_bucket``)."""
    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), float(sample.value)))
    return out


def read_layer_gauges(text: str, name: str) -> dict[int, float]:
    """A per-layer gauge as {layer: value} (multiprocess gauges may carry a pid label)."""
    values: dict[int, float] = {}
    for labels, value in samples(text, name):
        if "layer" in labels:
            values[int(labels["layer"])] = value
    return values


def metric_sum(text: str, name: str) -> float:
    return sum(value for _, value in samples(text, name))

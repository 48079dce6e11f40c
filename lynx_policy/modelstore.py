"""The controller's latency models, one per replica: learnt from StepStats, persisted next to
the controller state (``model.json`` in ``state.dir``, written atomically), read by the loop
(`FleetModel`) and the admin API (``GET /v1/model``).

A replica's samples are kept while its registration (model, experts, top-k) stays the same;
a different registration starts it afresh. A model file that cannot be read is moved aside
(``model.json.bad``) with a warning and the models are learnt again: they are derived data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from lynx_policy.model import (
    MAX_SAMPLES,
    FleetModel,
    LatencyFit,
    MassPoint,
    Sample,
    fit_latency,
    samples_from_stats,
)
from lynx_policy.state import write_atomically
from lynx_protocol.messages import Register, StepStats

log = logging.getLogger(__name__)

MODEL_FILE = "model.json"
MODEL_SCHEMA = 1
SAVE_EVERY_S = 10.0


class ReplicaModel(msgspec.Struct, kw_only=True):
    """Everything learnt about one replica."""

    replica_id: str
    model: str
    num_experts: int
    top_k: int
    samples: list[Sample] = msgspec.field(default_factory=list)
    mass: list[MassPoint] = msgspec.field(default_factory=list)
    fit: LatencyFit = msgspec.field(default_factory=LatencyFit)
    updated_at: float = 0.0
    """Unix time of the newest sample [s]."""

    def matches(self, registration: Register) -> bool:
        return (self.model, self.num_experts, self.top_k) == (
            registration.model, registration.num_experts, registration.top_k)


class _File(msgspec.Struct, kw_only=True):
    schema: int = MODEL_SCHEMA
    replicas: dict[str, ReplicaModel] = msgspec.field(default_factory=dict)


class ModelStore:
    def __init__(self, state_dir: str | Path, clock: Any = time.time) -> None:
        self.path = Path(state_dir) / MODEL_FILE
        self.clock = clock
        self.replicas: dict[str, ReplicaModel] = self._load()
        self._dirty = False
        self._saved_at = 0.0
        self._cursor: dict[str, float] = {}  # replica -> receive time of the newest ingested

    def ingest_new(self, replicas: Iterable[Any]) -> int:
        """Ingest the StepStats that hub replicas (`lynx_policy.replica.Replica`) received since
        the last call; returns the samples added."""
        added = 0
        for replica in replicas:
            cursor = self._cursor.get(replica.replica_id, float("-inf"))
            fresh = [(at, s) for at, s in replica.recent_stats if at > cursor]
            if fresh:
                self._cursor[replica.replica_id] = fresh[-1][0]
                added += self.ingest(replica.registration, [s for _, s in fresh])
        return added

    def _load(self) -> dict[str, ReplicaModel]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = msgspec.json.decode(raw, type=_File)
            if data.schema != MODEL_SCHEMA:
                raise ValueError(f"schema {data.schema}, expected {MODEL_SCHEMA}")
        except (msgspec.MsgspecError, ValueError) as exc:
            aside = self.path.with_name(MODEL_FILE + ".bad")
            self.path.replace(aside)
            log.warning("latency models in %s unreadable (%s): moved to %s, learning afresh",
                        self.path, exc, aside.name)
            return {}
        return data.replicas

    def ingest(self, registration: Register, stats: Iterable[StepStats]) -> int:
        """Add the samples of ``stats`` (new StepStats of one replica) and refit; returns the
        number of samples added."""
        rid = registration.replica_id
        record = self.replicas.get(rid)
        if record is None or not record.matches(registration):
            record = ReplicaModel(replica_id=rid, model=registration.model,
                                  num_experts=registration.num_experts,
                                  top_k=registration.top_k)
            self.replicas[rid] = record
        added = 0
        for message in stats:
            samples, points = samples_from_stats(message, record.num_experts, record.top_k)
            record.samples.extend(samples)
            record.mass.extend(points)
            added += len(samples)
        if not added:
            return 0
        del record.samples[:-MAX_SAMPLES]
        del record.mass[:-MAX_SAMPLES]
        record.fit = fit_latency(record.samples)
        record.updated_at = self.clock()
        self._dirty = True
        return added

    def compare(self, recent: Iterable[tuple[str, StepStats]]
                ) -> dict[int, tuple[float, float | None]]:
        """Observed vs predicted mean decode-step latency [ms] per runtime bucket
        (``max_batch``; 0 is above the last edge) over (replica id, StepStats) pairs; each
        replica's steps are predicted by its own fit (None while no fit is ready)."""
        sums: dict[int, list[float]] = {}  # max_batch -> [steps, observed sum, predicted sum]
        ready: dict[int, bool] = {}
        for rid, message in recent:
            record = self.replicas.get(rid)
            if record is None:
                continue
            samples, _ = samples_from_stats(message, record.num_experts, record.top_k)
            buckets = [b for b in message.decode_buckets if b.steps]
            for bucket, sample in zip(buckets, samples, strict=True):
                row = sums.setdefault(bucket.max_batch, [0.0, 0.0, 0.0])
                row[0] += sample.steps
                row[1] += sample.latency_ms * sample.steps
                row[2] += record.fit.predict(sample.batch, sample.experts) * sample.steps
                ready[bucket.max_batch] = ready.get(bucket.max_batch, True) and record.fit.ready
        return {mb: (obs / n, pred / n if ready[mb] else None)
                for mb, (n, obs, pred) in sums.items() if n}

    def fleet(self, replica_ids: Iterable[str]) -> FleetModel | None:
        """The model of these (connected) replicas; None when none has samples."""
        records = [self.replicas[r] for r in replica_ids if r in self.replicas]
        records = [r for r in records if r.samples]
        if not records:
            return None
        return FleetModel(
            fits=tuple(r.fit for r in records),
            num_experts=min(r.num_experts for r in records),
            top_k=max(r.top_k for r in records),
            mass_points=tuple(p for r in records for p in r.mass),
            largest_batch=max(s.batch for r in records for s in r.samples))

    def reset(self, replica_id: str | None = None) -> int:
        """Forget the samples of one replica (or all); returns how many were forgotten."""
        ids = list(self.replicas) if replica_id is None else [replica_id]
        dropped = sum(1 for r in ids if self.replicas.pop(r, None) is not None)
        self._dirty = self._dirty or bool(dropped)
        self.save(force=True)
        return dropped

    def save(self, force: bool = False) -> None:
        """Write ``model.json`` when something changed (at most every `SAVE_EVERY_S`)."""
        now = self.clock()
        if not self._dirty or (not force and now - self._saved_at < SAVE_EVERY_S):
            return
        try:
            write_atomically(self.path, msgspec.json.encode(_File(replicas=self.replicas)))
        except OSError as exc:  # the models are derived data: warn, keep serving
            log.error("latency models not saved to %s: %s", self.path, exc.strerror)
            return
        self._dirty, self._saved_at = False, now

    def view(self) -> dict[str, Any]:
        """Per replica: the fit (coefficients, error, readiness) and how much it has seen."""
        return {rid: {"model": r.model, "num_experts": r.num_experts, "top_k": r.top_k,
                      "fit": msgspec.to_builtins(r.fit), "samples": len(r.samples),
                      "mass_points": len(r.mass), "updated_at": r.updated_at,
                      "batch_range": [min((s.batch for s in r.samples), default=0.0),
                                      max((s.batch for s in r.samples), default=0.0)],
                      "experts_range": [min((s.experts for s in r.samples), default=0.0),
                                        max((s.experts for s in r.samples), default=0.0)]}
                for rid, r in sorted(self.replicas.items())}

"""WORKERS > 1: one `/metrics` scrape answers for the whole instance, whichever worker the kernel hands it to.

Each worker keeps its figures in its own memory (plain integers on the hot path, service/metrics.py), so a
scrape used to see one worker's numbers, a different one each time: every counter jumped backwards between
scrapes. prometheus_client's multiprocess mode does not help: it aggregates only its own Counter/Gauge/Histogram
objects (one mmap'd file each, written on every update), not the collectors that expose our plain integers at
scrape time, and it would put file writes on the hot path.

Instead each worker writes a snapshot of everything its registry collects to `w<index>.json` in a directory the
parent creates for this instance (workers.py; removed at exit), atomically (a temp file, then rename): once a
second, and on every scrape it answers. The worker answering a scrape takes its own figures live and every
other worker's from its file, and merges them (`merge`): counters and histograms summed (`_created`: the
earliest), gauges summed (streams open, Redis subscriptions held, commands in flight) except `sse_broker_up`,
the minimum (the instance is up when every worker's Redis connections are).

Why no counter goes backwards between two scrapes, whichever workers answer them: every figure a scrape shows
is either the answering worker's own, which it writes to its file before answering, or read from a file; so a
later scrape reads, for each worker, that worker's live figures or a file at least as new as what was shown.
Another worker's figures lag by at most the write interval (a second), which is well under any scrape interval.

A worker that dies and is restarted: the parent starts the replacement only once the old process is gone, and
the replacement carries the counters of its predecessor's last file (`carried`) into its own, so the instance's
totals go on from where they were instead of showing a counter reset. What the dead worker counted after its
last write (a second at most) and never showed is lost, as it is with any crashed process; nothing it showed
is taken back. Until the replacement writes, the old file still counts, its counters only: the gauges of a
file whose process is gone (its streams closed with it) are left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric


class Metrics(Protocol):
    """What is shared of a worker's metrics (`metrics.Metrics`): its registry, collected at each write."""

    registry: CollectorRegistry

__all__ = ["SharedMetrics", "merge"]

log = logging.getLogger("service.metrics")

WRITE_INTERVAL = 1.0
# Gauges where the instance's figure is the worst worker's, not the sum.
MIN_GAUGES = frozenset({"sse_broker_up"})
_SUMMED_TYPES = frozenset({"counter", "histogram", "summary"})

Families = list[Metric]


def _dump(pid: int, families: Iterable[Metric]) -> bytes:
    return orjson.dumps({"pid": pid, "families": [
        [f.name, f.type, f.documentation, f.unit, [[s.name, s.labels, s.value] for s in f.samples]]
        for f in families]})


def _load(raw: bytes) -> tuple[int, Families]:
    doc = orjson.loads(raw)
    families = []
    for name, kind, documentation, unit, samples in doc["families"]:
        family = Metric(name, documentation, kind, unit)
        for sample_name, labels, value in samples:
            family.add_sample(sample_name, labels, value)
        families.append(family)
    return int(doc["pid"]), families


def merge(sources: Iterable[tuple[Families, bool]]) -> Families:
    """One set of families out of several workers', each given with whether its process is alive.

    Counters and histograms are summed sample by sample, their `_created` the earliest; gauges are summed (the
    minimum for `MIN_GAUGES`), from live processes only. Families keep the order in which they first appear.
    """
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families, alive in sources:
        for family in families:
            summed = family.type in _SUMMED_TYPES
            if not summed and not alive:
                continue
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            into = values[family.name]
            lowest = not summed and family.name in MIN_GAUGES
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = into.get(key)
                if old is None:
                    into[key] = sample.value
                elif lowest or sample.name.endswith("_created"):
                    into[key] = min(old, sample.value)
                else:
                    into[key] = old + sample.value
    out = []
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Fixed:
    """A collector handing out the families of one merge, so prometheus_client formats them as it always does."""

    def __init__(self) -> None:
        self.families: Families = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)

    def describe(self) -> list[Metric]:
        return []


class SharedMetrics:
    """One worker's side: writes its figures for the others, and answers a scrape with everyone's."""

    def __init__(self, metrics: Metrics, directory: Path, index: int) -> None:
        self._metrics = metrics
        self._dir = directory
        self._name = f"w{index}.json"
        self._path = directory / self._name
        self._pid = os.getpid()
        self._out = _Fixed()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._out)
        self._written = b""
        # The counters of the process this worker replaces (none for the first one): see the module docstring.
        self.carried: Families = []
        with contextlib.suppress(FileNotFoundError):
            _, families = _load(self._path.read_bytes())
            self.carried = [f for f in families if f.type in _SUMMED_TYPES]

    def snapshot(self) -> Families:
        """This worker's figures now, with its predecessor's counters added."""
        own = list(self._metrics.registry.collect())
        return merge([(own, True), (self.carried, False)]) if self.carried else own

    def write(self, families: Iterable[Metric] | None = None) -> None:
        """Replace this worker's file (atomically: readers see the old one or the new one) unless it holds these
        very figures already (an idle worker costs a collect a second, no file I/O)."""
        data = _dump(self._pid, self.snapshot() if families is None else families)
        if data == self._written:
            return
        tmp = self._path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self._path)
        self._written = data

    def _others(self) -> Iterator[tuple[Families, bool]]:
        for path in self._dir.glob("w*.json"):
            if path.name == self._name:
                continue
            try:
                pid, families = _load(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as exc:  # gone meanwhile (the instance stops)
                log.debug("skipped a worker's metrics", extra={"file": path.name, "error": str(exc)})
                continue
            yield families, _alive(pid)

    def render(self) -> bytes:
        mine = self.snapshot()
        self.write(mine)  # before answering: what this scrape shows, a later one answered elsewhere shows too
        self._out.families = merge([(mine, True), *self._others()])
        try:
            return generate_latest(self._registry)
        finally:
            self._out.families = []

    async def run(self, interval: float = WRITE_INTERVAL) -> None:
        """Write this worker's figures every `interval` seconds, for scrapes the other workers answer."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.write()
            except OSError as exc:
                log.warning("could not write this worker's metrics", extra={"error": str(exc)})

    def close(self) -> None:
        """A last write as the worker stops, so its final counts survive it."""
        with contextlib.suppress(OSError):
            self.write()

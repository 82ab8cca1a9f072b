"""The Grafana dashboard (deploy/grafana/) and the Prometheus alerting rules (deploy/prometheus/alerts.yml) name only
metrics the service exports: the names come from a live instance's /metrics (on a real redis-server, so the
Redis broker's metrics are there too), not from a list kept by hand. `promtool` (Debian's `prometheus` package)
checks the rule file and runs its unit tests (deploy/prometheus/alerts.test.yml) when it is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from .support import ROOT, RedisServer, ServiceProcess

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

DASHBOARD = ROOT / "deploy" / "grafana" / "sse-relay-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
CONFIGMAP = ROOT / "deploy" / "k8s" / "configmap.yaml"

# What is not a metric name in a PromQL expression: keywords, and Grafana's own variables (removed first).
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Every sample name a live instance (Redis broker) can expose: each family of its /metrics with the
    suffixes of its type (counter: _total, histogram: _bucket/_sum/_count, both: _created)."""
    tmp = tmp_path_factory.mktemp("metrics")
    redis = RedisServer(tmp / "redis")
    redis.dir.mkdir()
    redis.start()
    svc = ServiceProcess(tmp, env={"REDIS_URL": redis.url, "LOG_LEVEL": "warning"}, name="metrics")
    try:
        svc.start()
        # a publish and a request, so that every family has been through its code path once
        assert httpx.post(f"{svc.url}/channels/m/messages", json={"data": 1}, timeout=5).status_code == 202
        text = httpx.get(f"{svc.url}/metrics", timeout=5).text
    finally:
        svc.kill()
        redis.stop()
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split()
            base = family.removesuffix("_total")
            names.add(family)
            if kind == "counter":
                names |= {base + "_total", base + "_created"}
            elif kind == "histogram":
                names |= {family + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert {"sse_streams_open", "sse_broker_up", "sse_publish_to_dispatch_seconds_bucket",
            "sse_redis_errors_total", "sse_broker_reconnects_total"} <= names, sorted(names)
    yield names


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords, label names or
    durations. Strings (label values), label matchers, grouping lists and ranges are removed first."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, with Grafana variables in them
    expr = re.sub(r"\$\{?\w+\}?", "1", expr)  # Grafana variables outside strings ([$__rate_interval])
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = m.group(0), expr[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function call, or a keyword
        if m.start() > 0 and expr[m.start() - 1].isdigit():
            continue  # the unit of a number (1e3) or a duration (5m)
        names.add(word)
    return names


def test_metric_names_are_found_in_expressions() -> None:
    assert metric_names('sum by (le) (rate(sse_x_bucket{instance=~"$instance"}[$__rate_interval]))') == {"sse_x_bucket"}
    assert metric_names("sse_a > 0.9 * 20000 and on (instance) sse_b offset 5m") == {"sse_a", "sse_b"}
    assert metric_names('histogram_quantile(0.99, sum by (instance, le) (rate(y_bucket[5m]))) > 0.5') == {"y_bucket"}
    assert metric_names("label_values(sse_streams_open, instance)") == {"sse_streams_open", "instance"}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def test_every_dashboard_query_names_only_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [n["expr"] for n in _walk(dashboard["panels"]) if "expr" in n]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(exprs) >= len(panels) >= 15
    unknown = {e: sorted(metric_names(e) - exported) for e in exprs if metric_names(e) - exported}
    assert not unknown, unknown
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
        assert p.get("description"), f"{p['title']}: say what it shows"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # the variable query reads the same metrics (its `instance` is the label it lists)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert metric_names(var["query"]["query"]) - {"instance"} <= exported, var
    # the panels an operator needs, by the metric each one reads
    everything = " ".join(exprs)
    for needed in ("sse_streams_open", "sse_messages_published_total", "sse_messages_delivered_total",
                   "sse_publish_to_dispatch_seconds_bucket", "sse_slow_client_disconnects_total",
                   "sse_redis_errors_total", "sse_broker_reconnects_total", "sse_http_requests_total",
                   "sse_publish_rejected_total", "sse_broker_up"):
        assert needed in everything, f"no panel reads {needed}"
    assert "histogram_quantile(" in everything


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_every_alert_names_only_exported_metrics_and_covers_the_documented_states(exported: set[str]) -> None:
    rules = _rules()
    unknown = {r["alert"]: sorted(metric_names(r["expr"]) - exported) for r in rules
               if metric_names(r["expr"]) - exported}
    assert not unknown, unknown
    by_metric = {name: r["alert"] for r in rules for name in metric_names(r["expr"])}
    # docs/reliability.md's states: broker down, reader reconnecting, slow-client cut-offs, streams near
    # MAX_STREAMS, publish rejections (and Redis errors by kind)
    for needed in ("sse_broker_up", "sse_broker_reconnects_total", "sse_slow_client_disconnects_total",
                   "sse_streams_open", "sse_publish_rejected_total", "sse_redis_errors_total"):
        assert needed in by_metric, f"no alert on {needed}"
    for r in rules:
        assert r["labels"]["severity"] in {"critical", "warning", "info"} and r["annotations"]["summary"], r


def test_streams_near_max_uses_the_shipped_max_streams() -> None:
    """The alert cannot read MAX_STREAMS: its threshold is written as 0.9 * the ConfigMap's value."""
    max_streams = int(yaml.safe_load(CONFIGMAP.read_text())["data"]["MAX_STREAMS"])
    rule = next(r for r in _rules() if r["alert"] == "SseRelayStreamsNearMax")
    assert rule["expr"].replace(" ", "") == f"sse_streams_open>0.9*{max_streams}"


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's `prometheus` package; scripts/test installs it)")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"

"""DermaNet's metrics, statically: the refusal vocabulary, and every metric name the Grafana
dashboard and the alert rules query is one the code serves (DermaNet's own from
dermanet/serving/metrics.py, Ray Serve's from Ray's own metric definitions)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray.serve
import yaml

from dermanet.monitoring.reasons import KINDS, OOD, OTHER, PREFIXES, reason_kind, reason_kinds
from dermanet.paths import PROJECT_ROOT
from dermanet.serving.metrics import METRICS, exported_names
from dermanet.trust.evaluation import gate_decision
from dermanet.trust.quality import (
    CHECKS,
    REASONS,
    QualityReport,
    QualityThresholds,
    assess_quality,
    measure_quality,
)

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "dermanet.json"
ALERTS = PROJECT_ROOT / "deploy" / "prometheus" / "alerts.yml"
NAME = re.compile(r"\b(ray_[a-zA-Z0-9_]+)\b")
RAY_METRIC = re.compile(r"metrics\.(?:Counter|Gauge|Histogram)\(\s*(?:name\s*=\s*)?\"(serve_\w+)\"")


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_queries() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def ray_serve_names() -> set[str]:
    """Names Ray Serve's code declares with ray.util.metrics, as Prometheus serves them."""
    names = set()
    for source in Path(ray.serve.__file__).parent.rglob("*.py"):
        for name in RAY_METRIC.findall(source.read_text(errors="replace")):
            names |= {f"ray_{name}", f"ray_{name}_total", f"ray_{name}_bucket"}
    return names


def test_every_quality_check_and_ood_maps_back_to_its_name():
    """Each quality check's reason as `assess_quality` words it, and the OOD reason: the kind
    read back from the words is the check's name."""
    limits = QualityThresholds()
    image = np.full((100, 400, 3), 128, dtype=np.uint8)
    values = {**measure_quality(image), **limits.to_dict(), "width": 400, "height": 100}
    tripped = [(check, REASONS[check].format(**values, grain=18.0)) for check in CHECKS]
    for shape in ((20, 20, 3), (100, 400, 3)):  # too small; extreme aspect ratio, as worded
        report = assess_quality(np.full(shape, 128, dtype=np.uint8), limits)
        tripped += list(zip(report.failed, report.reasons, strict=True))
    assert {check for check, _ in tripped} == set(CHECKS)
    for check, reason in tripped:
        assert reason_kind(reason) == check, reason
    for score in (3.0, float("inf")):
        gate = gate_decision(QualityReport(ok=True), score, 2.0)
        assert reason_kinds(gate["reasons"]) == [OOD]
    assert reason_kind("a reason from a newer gate") == OTHER
    assert set(PREFIXES.values()) | {OTHER} == set(KINDS)


def test_metric_definitions_follow_rays_export_names():
    names = exported_names()
    assert "ray_dermanet_requests_total" in names
    assert {"ray_dermanet_ood_score_bucket", "ray_dermanet_model_info"} <= names
    for metric in METRICS.values():
        assert not metric.name.endswith("_total"), "Ray adds _total to counters itself"
        assert metric.kind in ("counter", "gauge", "histogram")
        assert (metric.kind == "histogram") == bool(metric.boundaries)
        assert all(b > 0 for b in metric.boundaries), "Ray refuses bounds <= 0"
        assert list(metric.boundaries) == sorted(set(metric.boundaries))
        assert {"image", "user", "request_id", "path"}.isdisjoint(metric.tags)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_served_metric_names(source: str):
    queries = dashboard_queries() if source == "dashboard" else alert_queries()
    used = {name for query in queries for name in NAME.findall(query)}
    ours = {name for name in used if name.startswith("ray_dermanet_")}
    assert ours - exported_names() == set(), "names the code does not serve"
    assert used - ours - ray_serve_names() == set(), "names Ray Serve does not declare"
    if source == "dashboard":  # every DermaNet metric is on the dashboard
        shown = {name.removesuffix("_total").removesuffix("_bucket") for name in ours}
        assert shown == {f"ray_{name}" for name in METRICS}


def test_dashboard_panels_are_complete():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "DermaNet"
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/v1/classify", "/v1/classify"),
        ("GET", "/v1/classify", "/v1/classify"),  # a 405: the path's route all the same
        ("GET", "/v1/cases/12", "/v1/cases/{case_id}"),  # a route of the included cases router
        ("GET", "/healthz/live", "/healthz/live"),
        ("GET", "/v1/nothing", "unmatched"),
    ],
)
def test_answers_before_routing_are_labelled_with_the_route_their_path_matches(
    method: str, path: str, route: str
):
    """A 401 of the key check or an admission 503 is sent before routing: the label is still
    the route template, never the raw path."""
    from dermanet.serving.ingress import api
    from dermanet.serving.metrics import route_template

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": api}
    assert route_template(scope) == route
    assert route_template({"route": SimpleNamespace(path="/chosen")}) == "/chosen"

"""DermaNet's metrics under real Serve traffic: dermoscopic-like pictures (planted SYNTHETIC
lesions) and pictures that are not dermoscopy go through /v1/classify, then Ray's metrics
endpoint (every node's MetricsExportPort) serves all six ray_dermanet_* metrics, with the
refusals counted by the kind of reason the answers gave. Ray exports every few seconds, so the
test polls with a deadline."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from dermanet.monitoring.reasons import reason_kinds
from dermanet.serving.metrics import exported_names

pytest_plugins = ["conftest_serve"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]  # session setup: model + Serve
EXPORT_DEADLINE_S = 45

Samples = dict[tuple[str, frozenset], float]


def scrape() -> Samples:
    """Every sample on every live node's metrics endpoint, summed over the labels Ray adds."""
    samples: Samples = Counter()
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for s in family.samples:
                if s.name.startswith("ray_dermanet_"):
                    samples[(s.name, frozenset(s.labels.items()))] += s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and want <= got)


def test_all_dermanet_metrics_are_served(
    serve_url, serve_headers, model_registry: Path, not_dermoscopy, planting, tmp_path
):
    before = scrape()
    tiles = planting.tiles(tmp_path, num_images=8, seed=11)
    lesions = [planting.encode(image) for image in planting.planted(tiles, seed=12)[0]]
    answers = []
    with httpx.Client(base_url=serve_url, headers=serve_headers, timeout=120) as client:
        files = [("file", (f"l{i}.png", data, "image/png")) for i, data in enumerate(lesions)]
        several = client.post("/v1/classify?model=trusted", files=files)
        assert several.status_code == 200, several.text
        answers += several.json()["results"]
        for name, data in not_dermoscopy.items():
            response = client.post(
                "/v1/classify?model=trusted", files={"file": (name, data, "image/png")}
            )
            assert response.status_code == 200, response.text
            answers.append(response.json())
        wrong_type = client.post(
            "/v1/classify", content=b"text", headers={"content-type": "text/plain"}
        )
        assert wrong_type.status_code == 415
        unsigned = httpx.post(f"{serve_url}/v1/classify", files={"file": ("l.png", lesions[0])})
        assert unsigned.status_code == 401  # refused before routing: still counted by route
    gates = [answer["gate"] for answer in answers]
    refused = Counter(reason_kinds(g["reasons"])[0] for g in gates if not g["accepted"])
    accepted = Counter(a["top_class"] for a in answers if a["gate"]["accepted"])
    scored = sum(g["ood_score"] is not None for g in gates)
    assert {"blank", "too_small"} <= set(refused) and accepted and scored
    sha256 = hashlib.sha256((model_registry / "trusted.pt").read_bytes()).hexdigest()
    classify = {"route": "/v1/classify"}
    expected = {  # (metric, labels): the least it must have grown by
        **{("ray_dermanet_gate_refusals_total", (("reason", k),)): n for k, n in refused.items()},
        **{("ray_dermanet_predictions_total", (("label", k),)): n for k, n in accepted.items()},
        ("ray_dermanet_requests_total", (("route", "/v1/classify"), ("status", "200"))): 5,
        ("ray_dermanet_requests_total", (("route", "/v1/classify"), ("status", "415"))): 1,
        ("ray_dermanet_requests_total", (("route", "/v1/classify"), ("status", "401"))): 1,
        ("ray_dermanet_request_seconds_count", tuple(classify.items())): 7,
        ("ray_dermanet_request_seconds_bucket", (*classify.items(), ("le", "+Inf"))): 7,
        ("ray_dermanet_ood_score_count", ()): scored,
        ("ray_dermanet_ood_score_bucket", (("le", "+Inf"),)): scored,
    }
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        after = scrape()
        grown = {key: total(after, key[0], **dict(key[1])) - total(before, key[0], **dict(key[1]))
                 for key in expected}  # fmt: skip
        short = {key: (grown[key], n) for key, n in expected.items() if grown[key] < n}
        info = total(after, "ray_dermanet_model_info", id="trusted", sha256=sha256)
        if (not short and info >= 1) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not short, f"not exported within {EXPORT_DEADLINE_S} s (grown, needed): {short}"
    assert info >= 1, "no model_info for the trusted model's file"
    assert {name for name, _ in after} == exported_names()  # all six, under the declared names

"""Prometheus and Grafana for compose's `monitoring` profile: promtool accepts the config, the scrape targets
are the compose services on the ports they listen on, and the dashboard's PromQL is valid and names only
series the service and the trainer really export."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from deploy_files import (
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    exported_series,
    load_compose,
    service_command,
    service_environment,
    trainer_job,
)

from service.settings import Settings

DASHBOARD = GRAFANA_DIR / "dashboards" / "smollm.json"
_METRIC = re.compile(r"\bsmollm_\w+")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def _mounts(service: dict) -> dict[str, str]:
    """container path -> host path of a service's bind mounts."""
    out = {}
    for v in service["volumes"]:
        source, target, *_ = v.split(":")
        out[target] = source
    return out


def test_promtool_accepts_the_config(promtool):
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_targets_are_compose_services_on_their_metrics_ports():
    compose = load_compose()["services"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    server_port = Settings(port=service_environment(compose["server"]).get("SMOLLM_PORT", 8000)).port
    _args, trainer_config = trainer_job(service_command(compose["trainer"]))
    trainer_port = str(trainer_config.metrics_port)
    assert targets == {
        "smollm-server": ("/metrics", f"server:{server_port}"),
        "smollm-trainer": ("/metrics", f"trainer:{trainer_port}"),
    }
    assert trainer_port in compose["trainer"]["expose"]
    # Prometheus reads the file compose mounts at the path its command names.
    prometheus = compose["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert _mounts(prometheus)[config_flag.split("=", 1)[1]] == "./deploy/prometheus/prometheus.yml"


def test_grafana_provisioning_points_at_the_mounted_dashboard_and_datasource():
    compose = load_compose()["services"]
    mounts = _mounts(compose["grafana"])
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "smollm.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = service_environment(compose["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/" + DASHBOARD.name
    # Every panel queries the provisioned datasource by its uid.
    for panel in _dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


def test_dashboard_is_well_formed():
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses each expression as a recording rule (Grafana's $__rate_interval made concrete)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"smollm:dashboard:{i}", "expr": e.replace("$__rate_interval", "1m")}
                    for i, e in enumerate(_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_name_only_exported_series():
    exported = exported_series()
    used = {m for e in _exprs() for m in _METRIC.findall(e)}
    unknown = used - exported
    assert not unknown, f"the dashboard queries series nobody exports: {sorted(unknown)}"


@pytest.mark.parametrize(
    "series",
    [
        "smollm_requests_total",
        "smollm_time_to_first_token_seconds_bucket",
        "smollm_inter_token_latency_seconds_bucket",
        "smollm_generation_tokens_total",
        "smollm_running_sequences",
        "smollm_waiting_requests",
        "smollm_kv_cache_tokens_used",
        "smollm_trainer_loss",
        "smollm_trainer_tokens_per_second",
    ],
)
def test_dashboard_shows(series):
    assert any(series in e for e in _exprs()), f"no dashboard panel queries {series}"

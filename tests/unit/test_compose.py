"""deploy/compose: the stack's files agree with each other and with the repository.

No container engine with compose, and no registry for its images, runs on the test machines, so
this checks the structure `docker compose up` relies on: the services, every file it mounts, the
proxy's config (valid, on Redis, on the published ports), Redis refusing to evict, Prometheus
scraping the proxy's metrics port, Grafana provisioned with the dashboard and its datasource.
"""

import json
from pathlib import Path

import pytest
import yaml

from agentkeys.policy import load_config
from conftest import REPO

COMPOSE_DIR = REPO / "deploy" / "compose"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target))
    return mounts


def mounted(service: dict, container_path: str) -> Path:
    [host] = [host for host, target in bind_mounts(service) if target == container_path]
    return host


def test_the_stack_is_the_proxy_redis_prometheus_and_grafana(compose):
    assert set(compose["services"]) == {"agentkeys", "redis", "prometheus", "grafana"}
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in declared, f"{name}: undeclared volume {source}"


def test_every_bind_mount_exists_in_the_repository(compose):
    for name, service in compose["services"].items():
        for host, target in bind_mounts(service):
            assert host.exists(), f"{name} mounts {host} at {target}: no such file in the repository"
            assert REPO in host.parents, f"{name} mounts {host}, outside the repository"


def test_the_proxy_is_built_here_and_serves_its_mounted_config_on_redis(compose):
    proxy = compose["services"]["agentkeys"]
    assert (COMPOSE_DIR / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    config = load_config(mounted(proxy, "/etc/agentkeys/agentkeys.yaml"))
    assert config.listen_host == "0.0.0.0" and config.store.startswith("redis://redis:")
    published = {port.rsplit(":", 1)[1] for port in proxy["ports"]}
    assert published == {str(config.proxy_port), str(config.gateway_port), str(config.metrics_port)}
    assert Path(config.certs_dir).is_relative_to("/var/lib/agentkeys"), "the CA must live in the volume"
    assert "/var/lib/agentkeys" in [volume.split(":")[1] for volume in proxy["volumes"]]
    assert list(mounted(proxy, "/etc/agentkeys/policies").glob("*.policy.yaml"))
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"


def test_the_proxy_runs_workers_it_names_rather_than_one_per_core_of_the_host(compose):
    command = compose["services"]["agentkeys"]["command"]
    assert command[0] == "serve" and int(command[command.index("--workers") + 1]) >= 2


def test_redis_refuses_writes_rather_than_evict_budgets(compose):
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_prometheus_scrapes_the_proxys_metrics_port_as_the_dashboard_expects(compose):
    proxy, prometheus = compose["services"]["agentkeys"], compose["services"]["prometheus"]
    metrics_port = load_config(mounted(proxy, "/etc/agentkeys/agentkeys.yaml")).metrics_port
    scrape = yaml.safe_load(mounted(prometheus, "/etc/prometheus/prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["job_name"] == "agentkeys"  # the dashboard's "Proxies up" counts up{job="agentkeys"}
    assert job["static_configs"][0]["targets"] == [f"agentkeys:{metrics_port}"]
    dashboard = (REPO / "deploy" / "grafana" / "agentkeys.json").read_text()
    assert 'up{job=\\"agentkeys\\"}' in dashboard


def test_grafana_is_provisioned_with_the_dashboard_and_a_prometheus_datasource(compose):
    grafana = compose["services"]["grafana"]
    provisioning = mounted(grafana, "/etc/grafana/provisioning")
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "agentkeys.yaml").read_text())["providers"]
    dashboards_in_container = provider["options"]["path"]
    dashboards_on_host = mounted(grafana, dashboards_in_container)
    dashboard = json.loads((dashboards_on_host / "agentkeys.json").read_text())
    assert dashboard["uid"] == "agentkeys" and dashboard["panels"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/agentkeys.json"
    uses = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel.get("targets", [])}
    assert uses == {"${datasource}"}, "every query asks the dashboard's datasource variable"

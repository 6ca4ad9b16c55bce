"""deploy/ checked statically (no Docker engine or Kubernetes runs here): the files parse, and
images, ports, health checks and settings agree with each other and with the server's code.
Prometheus' own files go through promtool (check config, check rules, test rules)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from gmv_engine.settings import FIELDS, Settings
from gmv_server.healthcheck import SERVICE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Every variable gmv reads: one GMV_<FIELD> per setting, and GMV_CONFIG naming the file.
CLI_ENV = {"GMV_CONFIG"}
CONFIG_ENV = {f"GMV_{name.upper()}" for name in FIELDS}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed: `make test` installs Debian's prometheus package (apt-get)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY)


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def k8s():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(item.split("=", 1) for item in env) if isinstance(env, list) else {k: str(v) for k, v in env.items()}


def published(service: dict) -> set[int]:
    return {int(str(port).split(":")[-1]) for port in service.get("ports", [])}


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    joined = dockerfile().replace("\\\n", " ")
    env = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


# -- Prometheus -------------------------------------------------------------------------------
def test_promtool_check_rules():
    result = promtool("check", "rules", "prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass():
    result = promtool("test", "rules", "prometheus/alerts_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_promtool_check_config_and_it_scrapes_the_compose_services(compose):
    result = promtool("check", "config", "prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    gmv = compose["services"]["gmv"]
    assert targets["gmv"] == [f"gmv:{env_of(gmv)['GMV_METRICS_PORT']}"]
    assert targets["milvus"] == ["standalone:9091"]


# -- Compose ----------------------------------------------------------------------------------
def test_compose_runs_the_official_milvus_standalone_stack(compose):
    services = compose["services"]
    etcd, minio, milvus = services["etcd"], services["minio"], services["standalone"]
    assert etcd["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert minio["image"].startswith("minio/minio:RELEASE.")
    assert re.fullmatch(r"milvusdb/milvus:v2\.[4-9]\.\d+", milvus["image"]), milvus["image"]
    assert etcd["healthcheck"]["test"] == ["CMD", "etcdctl", "endpoint", "health"]
    assert "http://localhost:9000/minio/health/live" in minio["healthcheck"]["test"]
    assert "http://localhost:9091/healthz" in milvus["healthcheck"]["test"]
    assert milvus["command"] == ["milvus", "run", "standalone"]
    assert {k: v for k, v in env_of(milvus).items() if not k.startswith("MINIO_") or k == "MINIO_ADDRESS"} == {
        "ETCD_ENDPOINTS": "etcd:2379", "MINIO_ADDRESS": "minio:9000"}
    assert "0.0.0.0:2379" in etcd["command"] and set(milvus["depends_on"]) == {"etcd", "minio"}
    # Milvus, etcd and MinIO stay on the Compose network, and MinIO's credentials (shared with
    # Milvus) are generated into .env by make-secrets.sh: none is published, none has a default.
    assert not published(milvus) and not published(minio) and not published(etcd)
    assert env_of(minio) == {"MINIO_ROOT_USER": "${MINIO_ROOT_USER:?run ./make-secrets.sh first}",
                             "MINIO_ROOT_PASSWORD": "${MINIO_ROOT_PASSWORD:?run ./make-secrets.sh first}"}
    assert env_of(milvus)["MINIO_SECRET_ACCESS_KEY"] == env_of(minio)["MINIO_ROOT_PASSWORD"]
    assert env_of(milvus)["MINIO_ACCESS_KEY_ID"] == env_of(minio)["MINIO_ROOT_USER"]


def test_no_secret_is_written_in_the_deploy_files_or_typed_on_a_command_line():
    """Passwords come from generated files or Secrets, never from the Compose file, the
    manifests or a command the docs tell you to type."""
    texts = {path: path.read_text() for path in [*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"),
                                                  DEPLOY / "README.md", DEPLOY.parent / "README.md"]}
    for path, text in texts.items():
        for leak in ("minioadmin", "--from-literal", "admin/admin", ":PASSWORD@", "--ledger-url postgresql://",
                     "--milvus-token "):
            assert leak not in text, (path, leak)


def test_compose_gmv_service_points_at_milvus_and_is_health_checked(compose):
    gmv = compose["services"]["gmv"]
    env = env_of(gmv)
    assert env["GMV_MILVUS_URI"] == "http://standalone:19530"
    assert set(env) <= CONFIG_ENV | CLI_ENV, set(env) - CONFIG_ENV - CLI_ENV
    assert gmv["image"] == f"gmv:{VERSION}"
    assert (DEPLOY / gmv["build"]["context"] / gmv["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert published(gmv) == {int(env["GMV_PORT"]), int(env["GMV_METRICS_PORT"])}
    assert "127.0.0.1:9464:9464" in gmv["ports"]  # metrics: loopback on the host
    # TLS on the gRPC port from make-secrets.sh's files; the health check uses the plaintext health port.
    assert set(gmv["secrets"]) == set(compose["secrets"]) == {"gmv_tls_cert", "gmv_tls_key"}
    assert env["GMV_TLS_CERT"] == "/run/secrets/gmv_tls_cert" and env["GMV_TLS_KEY"] == "/run/secrets/gmv_tls_key"
    assert "openssl req -x509" in (DEPLOY / "make-secrets.sh").read_text()
    test = gmv["healthcheck"]["test"]
    assert test[:4] == ["CMD", "python", "-m", "gmv_server.healthcheck"]
    assert test[4] == f"127.0.0.1:{env['GMV_HEALTH_PORT']}"
    assert gmv["depends_on"]["standalone"]["condition"] == "service_healthy"
    # Compose's GMV_* settings are valid for the server's own config loader.
    config = Settings.load(env={k: v.split(":-")[-1].rstrip("}") for k, v in env.items()})
    assert (config.port, config.metrics_port, config.log_format) == (50051, 9464, "json")


def test_compose_prometheus_and_grafana_are_provisioned_with_the_dashboard(compose):
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus:v") and 9090 in published(prometheus)
    assert grafana["image"].startswith("grafana/grafana:") and 3000 in published(grafana)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    mounts = {}
    for service in (prometheus, grafana):
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounts[target] = DEPLOY / source
    assert (mounts["/etc/prometheus"] / "prometheus.yml").is_file()
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards" / "gmv.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert (mounts[dashboards_dir] / "gmv.json").is_file()
    assert env_of(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/gmv.json"
    datasource = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["type"] == "prometheus"


def test_compose_gpu_overlay_reserves_an_nvidia_gpu():
    overlay = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())
    (device,) = overlay["services"]["gmv"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# -- Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_cuda_base_ports_health_check_and_sources():
    text = dockerfile()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    env = dockerfile_env()
    assert set(k for k in env if k.startswith("GMV_")) <= CONFIG_ENV | CLI_ENV
    assert env["GMV_MODEL_DIR"] == "/models"
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {int(env["GMV_PORT"]), int(env["GMV_METRICS_PORT"])}
    assert re.search(r'^\s+CMD \["python", "-m", "gmv_server.healthcheck"\]', text, re.M)
    assert re.search(r'^ENTRYPOINT \["gmv"\]', text, re.M)
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"the Dockerfile copies {name}, which is not in the repository"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".gmv", "client/node/node_modules"} <= set(ignored)


# -- Kubernetes -------------------------------------------------------------------------------
def test_k8s_deployment_probes_the_grpc_health_service_and_requests_a_gpu(k8s):
    deployment = k8s["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"gmv:{VERSION}"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet's probe speaks no TLS
        assert container[probe]["grpc"] == {"port": ports["health"], "service": SERVICE}, probe
    (tls,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert tls["secret"]["secretName"] == "gmv-tls"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_config_is_what_the_server_loads_and_matches_the_ports(k8s, tmp_path):
    deployment, configmap = k8s["Deployment"], k8s["ConfigMap"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    config_path = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in container["volumeMounts"] if config_path.is_relative_to(m["mountPath"])]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    toml_file = tmp_path / config_path.name
    toml_file.write_text(configmap["data"][config_path.name])
    config = Settings.load(toml_file, env={})  # the server's own loader: unknown keys fail
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert (config.port, config.metrics_port, config.health_port) == (ports["grpc"], ports["metrics"], ports["health"])
    (tls_mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    assert Path(config.tls_cert).parent == Path(config.tls_key).parent == Path(tls_mount["mountPath"])
    assert pod["terminationGracePeriodSeconds"] > config.grace_s
    env = {item["name"]: item for item in container["env"]}
    assert set(env) <= CONFIG_ENV | CLI_ENV
    uri_ref = env["GMV_MILVUS_URI"]["valueFrom"]["configMapKeyRef"]
    assert configmap["data"][uri_ref["key"]].startswith("http://") and configmap["data"][uri_ref["key"]].endswith(":19530")
    (models,) = [m for m in container["volumeMounts"] if m["mountPath"] == dockerfile_env()["GMV_MODEL_DIR"]]
    (claim,) = [v for v in pod["volumes"] if v["name"] == models["name"]]
    assert claim["persistentVolumeClaim"]["claimName"] == k8s["PersistentVolumeClaim"]["metadata"]["name"]


def test_k8s_service_and_service_monitor_reach_the_metrics_port(k8s):
    deployment, service, monitor = k8s["Deployment"], k8s["Service"], k8s["ServiceMonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"] for port in container["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {port["targetPort"] for port in service_ports.values()} <= container_ports
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and service_ports[endpoint["port"]]["targetPort"] == "metrics"
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in (DEPLOY / "k8s").glob("*.yaml")
                                                         if p.name != "kustomization.yaml")


# -- Grafana ----------------------------------------------------------------------------------
def test_dashboard_loads_and_every_panel_queries_prometheus():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "gmv.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(re.search(r"\bgmv_", t["expr"]) for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    # The live server exports what these name: test_metrics.py checks each query against it.

"""The deploy files, checked without a Docker engine or a cluster.

Real validators where they exist (`haproxy -c`, the compose spec through check-jsonschema,
kubernetes-validate), then what no schema sees: that the compose file, the Kubernetes
manifests and the HAProxy config agree with each other and with the node (ports, probe paths,
grace periods, config keys, CLI flags). A missing tool skips with a reason, except under
CI=true, where it is a failure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from affinity_node.cli import build_parser
from affinity_node.config import ConfigError, NodeConfig, load_config
from tests.support.tools import require_module, require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
NODE_YAML = DEPLOY / "config" / "node.yaml"
K8S_DIR = DEPLOY / "k8s"
K8S = K8S_DIR / "base"
OVERLAYS = {p.name: p for p in sorted((K8S_DIR / "overlays").iterdir()) if p.is_dir()}
K8S_NODE_YAML = K8S / "config" / "node.yaml"
EXAMPLES = K8S_DIR / "examples"
DOCKERFILE = DEPLOY / "Dockerfile"
GRAFANA = REPO / "grafana"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"

IMAGE = "affinity-node:local"
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "HTTPRoute", "Cluster", "Pooler"}
"""Kinds without a schema in kubernetes-validate: shape-checked here instead."""
K8S_VERSIONS = ("1.27.0", None)
"""The oldest Kubernetes the manifests target, and kubernetes-validate's newest."""
FAKE_DSN = {"AFFINITY_DATABASE_DSN": "postgresql://u:p@db:5432/affinity"}
OTHERS = "written by another issue (prometheus/grafana); not there yet"

EXIT_MARGIN_S = 10
"""After the drain: aiohttp's 2 s for handlers still open, the last refresh flush, closing the
pool and the listener. Part of the timeout relation (deploy/README.md, "Timeouts and drain")."""
FIVE_MINUTES = 300


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


# -- loaders ---------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                yield path, doc


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for _, d in k8s_docs()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    doc: dict[str, Any] = found[0]
    return doc


def k8s_node_yaml() -> str:
    """The base's node config, which configMapGenerator turns into affinity-node-config-<hash>."""
    return K8S_NODE_YAML.read_text(encoding="utf-8")


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    found: dict[str, Any] = c
    return found


def load_node_config(text: str, tmp_path: Path, name: str) -> NodeConfig:
    """Through the node's own loader: an unknown or mistyped key fails here as it would at
    startup. The DSN comes from the environment, as in every deployment."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=FAKE_DSN)


def haproxy_sections() -> dict[str, list[str]]:
    """Section header ("backend nodes") -> its directive lines, comments stripped."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in HAPROXY_CFG.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            assert current is not None, f"directive outside a section: {raw!r}"
            current.append(" ".join(line.split()))
    return sections


def haproxy_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert m, value
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "ms"]
    return int(m.group(1)) * unit


def compose_seconds(value: str) -> float:
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", value):
        total += float(amount) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    assert total, value
    return total


def affinity_argv(svc: dict[str, Any]) -> list[str] | None:
    """The argv after `affinity-node` for a service running our image, else None."""
    entry = svc.get("entrypoint") or ["affinity-node"]
    command = svc.get("command") or []
    if isinstance(entry, str) or isinstance(command, str):
        raise AssertionError("use list form for entrypoint/command (no shell word splitting)")
    if entry[0] != "affinity-node":
        return None
    return [*entry[1:], *command]


def cli_commands(parser: argparse.ArgumentParser) -> set[str]:
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def gen_dashboards() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_dashboards", K8S_DIR / "gen_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- HAProxy ---------------------------------------------------------------------------------


def test_haproxy_config_is_valid_without_warnings() -> None:
    """`haproxy -c` with no warning: without `init-addr none`, the unresolvable `node` name
    (no Docker DNS here, none yet at container start) shows up as a warning here and as a
    fatal error when HAProxy starts."""
    haproxy = require_tool("haproxy", "apt-get install haproxy")
    result = run([haproxy, "-c", "-f", str(HAPROXY_CFG)])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output and "[ALERT]" not in output, output


def test_haproxy_config_has_the_deploy_idioms(tmp_path: Path) -> None:
    s = haproxy_sections()
    resolvers = s["resolvers docker"]
    assert "nameserver dns1 127.0.0.11:53" in resolvers
    backend = s["backend nodes"]
    assert "balance leastconn" in backend
    assert "option httpchk GET /readyz" in backend
    node = load_node_config(NODE_YAML.read_text(), tmp_path, "node.yaml")
    (template,) = [line for line in backend if line.startswith("server-template ")]
    words = template.split()
    assert words[1] == "node", template
    assert int(words[2]) >= service("node")["deploy"]["replicas"], "fewer slots than replicas"
    assert words[3] == f"node:{node.listen.port}", template
    # Health checks go to the ops port, where /readyz is; the API port does not serve it.
    assert node.listen.ops_port is not None
    for option in ("check", f"port {node.listen.ops_port}", "resolvers docker", "init-addr none"):
        assert option in template, f"server-template lacks {option!r}"
    defaults = s["defaults"]
    timeouts = {
        line.split()[1]: haproxy_seconds(line.split()[2])
        for line in defaults
        if line.startswith("timeout ")
    }
    # A stream may stay silent as long as the node lets its upstream stay silent.
    assert timeouts["server"] >= node.limits.upstream_read_timeout_seconds
    assert timeouts["client"] >= node.limits.upstream_read_timeout_seconds
    retry_on = next(line for line in defaults if line.startswith("retry-on "))
    assert "conn-failure" in retry_on and "503" in retry_on
    assert any(line.startswith("option redispatch") for line in defaults)
    stats = next(lines for name, lines in s.items() if name.startswith("frontend stats"))
    assert "http-request use-service prometheus-exporter if { path /metrics }" in stats
    assert "stats uri /stats" in stats
    assert "monitor-uri /ready" in stats  # the compose healthcheck of haproxy
    # The API frontend never forwards the nodes' probes or metrics to clients.
    api = s["frontend openai"]
    (hidden,) = [line for line in api if line.startswith("http-request return status 404")]
    assert hidden.endswith("if { path /metrics /healthz /readyz }"), hidden
    assert "unknown_url" in hidden


def timeout_violations(
    read: float, gen: float, drain: float, platform_grace: float, prestop: float, lb_server: float
) -> list[str]:
    """The relation of deploy/README.md, "Timeouts and drain"; what it finds broken."""
    broken = []
    if not read <= gen <= drain:
        broken.append(f"read {read} <= generation {gen} <= drain {drain}")
    if platform_grace < prestop + drain + EXIT_MARGIN_S:
        broken.append(f"grace {platform_grace} < preStop {prestop} + drain {drain} + margin")
    if lb_server < max(gen, read):
        broken.append(f"load balancer server timeout {lb_server} < {max(gen, read)}")
    return broken


def test_the_timeout_relation_holds_everywhere(tmp_path: Path) -> None:
    """One relation between the generation timeout, the drain, preStop and the grace periods,
    and HAProxy's server timeout, in every deployment (deploy/README.md, "Timeouts and drain"):

        upstream_read_timeout <= generation_timeout <= drain_timeout
        compose stop_grace_period         >= drain_timeout + EXIT_MARGIN (no preStop there)
        k8s terminationGracePeriodSeconds >= preStop + drain_timeout + EXIT_MARGIN
        HAProxy timeout server and client >= generation_timeout (and >= upstream_read_timeout)

    and the defaults let a 5-minute generation finish when a pod or container is replaced.
    """
    compose_cfg = load_node_config(NODE_YAML.read_text(), tmp_path, "compose.yaml")
    k8s_cfg = load_node_config(k8s_node_yaml(), tmp_path, "k8s.yaml")
    defaults = haproxy_sections()["defaults"]
    timeouts = {
        line.split()[1]: haproxy_seconds(line.split()[2])
        for line in defaults
        if line.startswith("timeout ")
    }
    lb = min(timeouts["server"], timeouts["client"])
    dep = k8s("Deployment", "affinity-node")
    pod = dep["spec"]["template"]["spec"]
    prestop = container(pod, "node")["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep"
    platforms = {
        "compose": (compose_cfg, compose_seconds(service("node")["stop_grace_period"]), 0.0),
        "k8s": (k8s_cfg, float(pod["terminationGracePeriodSeconds"]), float(prestop[1])),
    }
    for name, (cfg, grace, pre) in platforms.items():
        limits = cfg.limits
        read, gen, drain = (
            limits.upstream_read_timeout_seconds,
            limits.generation_timeout_seconds,
            limits.drain_timeout_seconds,
        )
        assert timeout_violations(read, gen, drain, grace, pre, lb) == [], name
        assert gen >= FIVE_MINUTES, name
    # The relation has teeth: the values before this issue (drain 30, grace 40 and 35, reads
    # of 600 s) break it.
    assert len(timeout_violations(600, 300, 30, 40, 5, 600)) == 2
    assert len(timeout_violations(600, 300, 30, 35, 0, 600)) == 2

    # A rollout waits for new pods, never for old ones to drain: it stays fast with a surge.
    rolling = dep["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0
    surge = rolling["maxSurge"]
    assert (int(surge.rstrip("%")) if isinstance(surge, str) else surge) > 0


# -- compose ---------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec() -> None:
    require_module("check_jsonschema", "check-jsonschema")
    result = run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_topology_and_start_order(tmp_path: Path) -> None:
    services = compose()["services"]

    pg = services["postgres"]
    major = int(re.search(r"postgres:(\d+)", pg["image"]).group(1))  # type: ignore[union-attr]
    assert major >= 16
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])

    migrate = services["migrate"]
    assert affinity_argv(migrate) == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "AFFINITY_DATABASE_DSN" in migrate["environment"]

    node = services["node"]
    assert node["deploy"]["replicas"] == 3
    # Fixed names or host ports would make `--scale node=N` collide.
    assert "ports" not in node and "container_name" not in node
    assert node["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in (n for n in services if n.startswith("backend")):
        assert node["depends_on"][name]["condition"] == "service_healthy"
    assert "AFFINITY_DATABASE_DSN" in node["environment"]
    argv = affinity_argv(node)
    assert argv is not None and argv[:2] == ["serve", "--config"]
    mount = f"./config/node.yaml:{argv[2]}:ro"
    assert mount in node["volumes"], f"the --config file must be deploy/config/node.yaml ({mount})"
    assert "stop_grace_period" in node  # its value: test_the_timeout_relation_holds_everywhere
    node_cfg = load_node_config(NODE_YAML.read_text(), tmp_path, "node.yaml")
    assert node["expose"] == [str(node_cfg.listen.port), str(node_cfg.listen.ops_port)]
    health = " ".join(services["haproxy"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8404/ready" in health

    assert services["haproxy"]["depends_on"]["node"]["condition"] == "service_started"
    mounts = services["haproxy"]["volumes"]
    assert "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in mounts

    bench = services["bench"]
    assert bench["profiles"] == ["bench"]
    script = bench["entrypoint"][2]
    assert (
        'exec affinity-node bench --url http://haproxy:8080 --api-keys-file "$$keys" "$$@"'
        in script
    )


def test_compose_dsn_reaches_the_compose_postgres() -> None:
    services = compose()["services"]
    dsn = services["node"]["environment"]["AFFINITY_DATABASE_DSN"]
    parts = urlsplit(dsn)
    assert parts.hostname == "postgres" and (parts.port or 5432) == 5432
    assert parts.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
    assert parts.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert "target_session_attrs=read-write" in parts.query


def test_compose_commands_parse_with_the_real_cli() -> None:
    """Every service running our image passes the node's own argument parser, so a renamed
    or mistyped flag fails here rather than in a crash-looping container."""
    parser = build_parser()
    checked = 0
    for name, svc in compose()["services"].items():
        if svc.get("image") != IMAGE:
            continue
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name
        if name == "bench":
            continue  # runs through a shell script; checked in the test below
        argv = affinity_argv(svc)
        assert argv is not None, f"{name}: entrypoint is not affinity-node"
        args = parser.parse_args(argv)
        checked += 1
        if argv[0] == "fake-backend":
            # The default host is loopback: unreachable from the other containers.
            assert args.host == "0.0.0.0", name
            assert args.id == name, f"{name}: --id must be the service name (x-backend-id)"
            assert (args.port, svc["expose"]) == (8000, ["8000"]), name
            health = " ".join(svc["healthcheck"]["test"])
            assert f"127.0.0.1:{args.port}/health" in health, name
    assert checked >= 6 and "bench" in compose()["services"]


def test_compose_bench_flags_parse_with_the_real_cli() -> None:
    parser = build_parser()
    if "bench" not in cli_commands(parser):
        pytest.skip("`affinity-node bench` is not in the CLI yet (another issue)")
    bench = service("bench")
    argv = ["bench", "--url", "http://haproxy:8080", "--api-key", "sk-test", *bench["command"]]
    parser.parse_args(argv)


def test_node_configs_load_with_the_node_loader(tmp_path: Path) -> None:
    compose_cfg = load_node_config(NODE_YAML.read_text(), tmp_path, "compose.yaml")
    k8s_text = k8s_node_yaml()
    k8s_cfg = load_node_config(k8s_text, tmp_path, "k8s.yaml")
    for cfg in (compose_cfg, k8s_cfg):
        assert cfg.listen.host == "0.0.0.0"
        assert cfg.database.dsn == FAKE_DSN["AFFINITY_DATABASE_DSN"]
        assert {m for b in cfg.backends for m in b.models} <= {m.name for m in cfg.models}
    # Everything but the backend addresses is the same in both deployments.
    for section in ("listen", "database", "affinity", "routing", "health", "limits", "models"):
        assert getattr(compose_cfg, section) == getattr(k8s_cfg, section), section
    # The check has teeth: the loader refuses a key the node does not know.
    data = yaml.safe_load(NODE_YAML.read_text())
    data["limits"]["drain_timeout"] = 5
    with pytest.raises(ConfigError, match="unknown key"):
        load_node_config(yaml.safe_dump(data), tmp_path, "bad.yaml")


def test_compose_backends_are_the_fake_backend_services(tmp_path: Path) -> None:
    services = compose()["services"]
    cfg = load_node_config(NODE_YAML.read_text(), tmp_path, "node.yaml")
    parser = build_parser()
    hosts = []
    for backend in cfg.backends:
        url = urlsplit(backend.url)
        assert url.scheme == "http" and url.hostname in services, backend.url
        argv = affinity_argv(services[url.hostname])
        assert argv is not None
        args = parser.parse_args(argv)
        assert args.port == url.port
        assert set(backend.models) <= set(args.model)
        assert backend.kind == "vllm"
        hosts.append(url.hostname)
    assert hosts == [f"backend{i}" for i in range(1, 5)]


def test_compose_bind_mounts_exist() -> None:
    ours: list[Path] = []
    others: list[Path] = []
    for svc in compose()["services"].values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith("."):
                continue  # a named volume
            path = (DEPLOY / source).resolve()
            is_other = path.is_relative_to(GRAFANA) or path.is_relative_to(DEPLOY / "prometheus")
            (others if is_other else ours).append(path)
    assert all(p.exists() for p in ours), [str(p) for p in ours if not p.exists()]
    assert others, "prometheus and grafana mounts are missing from the compose file"
    missing = [str(p.relative_to(REPO)) for p in others if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)}: {OTHERS}")


def test_prometheus_scrapes_compose_services() -> None:
    """Each scrape target (DNS SD or static) names a compose service on a port it serves."""
    if not PROMETHEUS_YML.exists():
        pytest.skip(f"deploy/prometheus/prometheus.yml: {OTHERS}")
    services = compose()["services"]
    # The node replicas are scraped on their ops port (the API port has no /metrics).
    ports = {"node": 8081, "haproxy": 8404, "prometheus": 9090, "grafana": 3000}
    ports |= {name: 8000 for name in services if name.startswith("backend")}
    cfg = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets: list[str] = []
    for job in cfg.get("scrape_configs", []):
        for sd in job.get("dns_sd_configs", []):
            targets += [f"{n}:{sd['port']}" for n in sd["names"]]
        for static in job.get("static_configs", []):
            targets += static["targets"]
    assert targets
    for target in targets:
        host, _, port = target.rpartition(":")
        if host in ("localhost", "127.0.0.1"):
            continue
        assert host in services, f"{target}: no such compose service"
        assert host in ports and int(port) == ports[host], f"{target}: wrong port"
    node_jobs = [
        job["job_name"]
        for job in cfg["scrape_configs"]
        if any("node" in sd["names"] for sd in job.get("dns_sd_configs", []))
    ]
    assert len(node_jobs) == 1, "the node replicas are not scraped (dns_sd_configs on node)"
    # The alerts select on this job; on Kubernetes the ServiceMonitor takes the job name from
    # the ops Service's label named by jobLabel, so both deployments give the same label.
    sm = k8s("ServiceMonitor")
    ops_service = k8s("Service", "affinity-node-ops")
    assert node_jobs[0] == ops_service["metadata"]["labels"][sm["spec"]["jobLabel"]]
    for rule_file in cfg.get("rule_files", []):
        assert rule_file.startswith(("/etc/prometheus/rules/", "rules/")), (
            f"{rule_file}: compose mounts the rules at /etc/prometheus/rules"
        )


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    if not (GRAFANA / "provisioning").is_dir():
        pytest.skip(f"grafana/provisioning: {OTHERS}")
    mounts = dict(v.rsplit(":", 2)[:2] for v in service("grafana")["volumes"] if ":" in v)
    dashboards_at = mounts["../grafana/dashboards"]
    providers = [
        p
        for f in sorted((GRAFANA / "provisioning").rglob("*.y*ml"))
        for p in (yaml.safe_load(f.read_text()) or {}).get("providers", [])
    ]
    assert providers, "no dashboard provider in grafana/provisioning"
    assert {p["options"]["path"] for p in providers} == {dashboards_at}
    datasources = [
        d
        for f in sorted((GRAFANA / "provisioning").rglob("*.y*ml"))
        for d in (yaml.safe_load(f.read_text()) or {}).get("datasources", [])
    ]
    urls = {urlsplit(d["url"]).netloc for d in datasources if d.get("type") == "prometheus"}
    assert urls == {"prometheus:9090"}, urls


# -- the image -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    text = DOCKERFILE.read_text(encoding="utf-8")
    return [
        line
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    # The base is pinned by digest, and one ARG names it for every stage.
    (arg,) = [line for line in instructions if line.startswith("ARG PYTHON_IMAGE=")]
    image = arg.split("=", 1)[1]
    m = re.fullmatch(r"python:3\.(\d+)(?:\.\d+)?-slim-bookworm@sha256:[0-9a-f]{64}", image)
    assert m, f"the base image is not pinned by digest: {image}"
    assert int(m.group(1)) == sys.version_info.minor == 11, "the image runs the tested Python"
    froms = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert froms and all(f == "${PYTHON_IMAGE}" for f in froms), froms
    user = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    # Dependencies from the lock, with hashes and wheels only; the project as a wheel.
    assert any(
        "pip install --require-hashes --only-binary=:all: -r requirements.lock" in line
        for line in instructions
    )
    assert "COPY deploy/requirements.lock ./" in instructions
    assert any(re.search(r"pip wheel --no-deps .* \.(\s|$)", line) for line in instructions)
    # The build backend comes from its own lock (hashes), never from an isolated build env.
    assert "COPY deploy/build-requirements.lock ./" in instructions
    assert any(
        "pip install --require-hashes --only-binary=:all: -r build-requirements.lock" in line
        for line in instructions
    )
    assert any("pip wheel --no-deps --no-build-isolation" in line for line in instructions)
    assert any(
        "pip install --no-deps /wheels/" in line and "pip check" in line for line in instructions
    )
    (health,) = [line for line in instructions if line.startswith("HEALTHCHECK ")]
    assert "/healthz" in health and "urllib.request" in health and "curl" not in health
    # The image's default config (deploy/config/node.yaml) serves /healthz on its ops port.
    ops_port = yaml.safe_load(NODE_YAML.read_text())["listen"]["ops_port"]
    assert f"'AFFINITY_LISTEN_OPS_PORT', '{ops_port}'" in health
    assert 'ENTRYPOINT ["affinity-node"]' in instructions
    cmd = next(line for line in instructions if line.startswith("CMD "))
    assert "serve" in cmd and "/etc/affinity-node/node.yaml" in cmd
    # Whatever the Dockerfile copies must survive .dockerignore (context: repository root).
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for copied in (
        "pyproject.toml",
        "README.md",
        "affinity_node/",
        "db/",
        "deploy/config/node.yaml",
        "deploy/requirements.lock",
        "deploy/build-requirements.lock",
    ):
        assert f"!{copied}" in ignore, copied
        assert (REPO / copied).exists(), copied


def locked() -> dict[str, tuple[str, str | None, int]]:
    """deploy/requirements.lock: canonical name -> (version, marker, number of hashes)."""
    text = (DEPLOY / "requirements.lock").read_text(encoding="utf-8")
    out: dict[str, tuple[str, str | None, int]] = {}
    for block in re.split(r"\n(?=\S)", re.sub(r"^#.*\n", "", text, flags=re.M)):
        first = block.split("\\", 1)[0].strip()
        if not first:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)\s*(?:;\s*(.+))?", first)
        assert m, f"not an exact pin: {first!r}"
        out[canonicalize_name(m.group(1))] = (m.group(2), m.group(3), block.count("--hash=sha256:"))
    return out


def test_the_lock_file_is_in_sync_with_pyproject() -> None:
    """Every runtime dependency of pyproject.toml is pinned in deploy/requirements.lock within
    its range, with hashes; the lock holds nothing the runtime does not need (no dev extra),
    and the dependencies of what it pins are pinned too (read from the installed metadata).
    Regenerate with the command in the lock's header (pip-tools) after changing the
    dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    lock = locked()
    assert lock, "empty lock"
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not in deploy/requirements.lock"
        version, marker, _ = lock[name]
        assert req.specifier.contains(version, prereleases=True), (req, version)
        assert (str(req.marker) if req.marker else None) == (
            str(Marker(marker)) if marker else None
        ), (req, marker)
    assert all(hashes > 0 for _, _, hashes in lock.values()), "a pin without a hash"
    text = (DEPLOY / "requirements.lock").read_text(encoding="utf-8")
    direct = {
        canonicalize_name(m.group(1))
        for m in re.finditer(
            # "# via affinity-node (pyproject.toml)", or that line in a list under "# via"
            r"^(\S+)==.*\n(?:\s+--hash.*\n)*"
            r"\s+# via(?: |\n(?:\s+#   (?!affinity-node).*\n)*\s+#   )affinity-node \(pyproject",
            text,
            re.M,
        )
    }
    assert direct == {canonicalize_name(r.name) for r in wanted}, "stale lock: rerun pip-compile"
    dev = [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    assert not {canonicalize_name(r.name) for r in dev} & set(lock) - {"typing-extensions"}
    # The lock is closed under dependencies (Docker's --require-hashes would refuse a gap).
    env = {"extra": "", "python_version": "3.11", "sys_platform": "linux"}
    for name in lock:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here: the Docker build checks it
        for raw in requires:
            dep = Requirement(raw)
            if dep.marker is None or dep.marker.evaluate(env):
                assert canonicalize_name(dep.name) in lock, f"{name} needs {dep.name}"
    # Built for the Python of the image.
    assert "with Python 3.11" in text


def test_the_wheel_ships_migrations_and_the_entry_point(tmp_path: Path) -> None:
    """What the image's `pip install .` relies on: `affinity-node migrate` reads the SQL from
    inside the installed package, and the console script exists."""
    require_module("hatchling", "hatchling")
    result = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(REPO),
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("affinity_node-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(
        n.rsplit("/", 1)[1]
        for n in names
        if n.startswith("affinity_node/store/migrations/") and n.endswith(".sql")
    )
    assert shipped == sorted(p.name for p in (REPO / "db" / "migrations").glob("*.sql"))
    # Developer tools (benchmarks, their SQL, the dashboard generator) and tests stay in the
    # source tree.
    assert not [n for n in names if n.startswith(("affinity_node/devtools/", "tests/"))]
    # Data files the package reads at run time (queries.sql) are in it too.
    for data in (REPO / "affinity_node").rglob("*.sql"):
        if "devtools" not in data.relative_to(REPO).parts:
            assert data.relative_to(REPO).as_posix() in names, data
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "affinity-node = affinity_node.cli:main" in text
    # What the wheel asks for at install is what the image's lock pins.
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        Requirement(line.split(":", 1)[1].strip())
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    runtime = {
        canonicalize_name(r.name) for r in requires if not r.marker or "extra" not in str(r.marker)
    }
    assert runtime and runtime <= set(locked())


# -- Kubernetes ------------------------------------------------------------------------------


def kustomization(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return data


def test_kustomization_lists_every_manifest() -> None:
    listed = kustomization(K8S)["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present
    assert len(set(listed)) == len(listed)


def test_config_is_a_hashed_configmap_so_a_change_rolls_the_pods() -> None:
    """configMapGenerator (with its default name suffix hash) in the base and in every overlay:
    an edit to node.yaml gives the ConfigMap a new name, hence a new pod template."""
    (generator,) = kustomization(K8S)["configMapGenerator"]
    assert generator == {"name": "affinity-node-config", "files": ["node.yaml=config/node.yaml"]}
    assert "generatorOptions" not in kustomization(K8S)
    plain = [d for _, d in k8s_docs() if d["metadata"]["name"] == "affinity-node-config"]
    assert plain == [], "a plain ConfigMap would not roll the pods when it changes"
    assert set(OVERLAYS) == {"dev", "prod"}
    for name, overlay in OVERLAYS.items():
        k = kustomization(overlay)
        assert "../../base" in k["resources"], name
        assert k["namespace"], name
        assert "generatorOptions" not in k, name
        (gen,) = k["configMapGenerator"]
        assert gen == {
            "name": "affinity-node-config",
            "behavior": "replace",
            "files": ["node.yaml"],
        }, name
        for resource in k["resources"]:
            assert (overlay / resource).exists(), (name, resource)


def test_overlay_configs_load_and_keep_the_timeout_relation(tmp_path: Path) -> None:
    """Each environment's node.yaml passes the node's loader and keeps the relation with the
    base Deployment's grace period (no overlay patches it)."""
    pod = k8s("Deployment", "affinity-node")["spec"]["template"]["spec"]
    prestop = float(container(pod, "node")["lifecycle"]["preStop"]["exec"]["command"][1])
    base = load_node_config(k8s_node_yaml(), tmp_path, "base.yaml")
    for name, overlay in OVERLAYS.items():
        cfg = load_node_config((overlay / "node.yaml").read_text(), tmp_path, f"{name}.yaml")
        limits = cfg.limits
        assert limits.upstream_read_timeout_seconds <= limits.generation_timeout_seconds
        assert limits.generation_timeout_seconds <= limits.drain_timeout_seconds
        assert pod["terminationGracePeriodSeconds"] >= (
            prestop + limits.drain_timeout_seconds + EXIT_MARGIN_S
        ), name
        assert (cfg.listen.port, cfg.listen.ops_port) == (base.listen.port, base.listen.ops_port)
        assert "terminationGracePeriodSeconds" not in (overlay / "kustomization.yaml").read_text()


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize`, where kubectl happens to exist (CI does not install it)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (optional: the manifests are validated one by one)")
    result = run([kubectl, "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("target", ["base", "dev", "prod"])
def test_kustomize_builds_what_the_files_promise(target: str, tmp_path: Path) -> None:
    directory = K8S if target == "base" else OVERLAYS[target]
    docs = kustomize(directory)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (cm,) = [c for c in by_kind["ConfigMap"] if "node.yaml" in c.get("data", {})]
    assert re.fullmatch(r"affinity-node-config-[a-z0-9]{10}", cm["metadata"]["name"])
    (dep,) = by_kind["Deployment"]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in volumes
    assert "replicas" not in dep["spec"]
    load_node_config(cm["data"]["node.yaml"], tmp_path, "rendered.yaml")
    if target != "base":
        namespace = kustomization(directory)["namespace"]
        assert {d["metadata"].get("namespace") for d in docs} == {namespace}
    if target == "prod":
        assert by_kind["NetworkPolicy"]
    # What the cluster would receive validates as a whole (CRDs aside).
    require_module("kubernetes_validate", "kubernetes-validate")
    files = []
    for i, doc in enumerate(docs):
        if doc["kind"] in CRD_KINDS:
            continue
        single = tmp_path / f"{i:02d}-{doc['kind'].lower()}.yaml"
        single.write_text(yaml.safe_dump(doc), encoding="utf-8")
        files.append(str(single))
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", "1.27.0"]
    result = run([*cmd, *files])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "latest")
def test_k8s_manifests_validate_strictly(version: str | None, tmp_path: Path) -> None:
    require_module("kubernetes_validate", "kubernetes-validate")
    files = []
    overlay_docs = [
        (path, doc)
        for overlay in OVERLAYS.values()
        for path in sorted(overlay.glob("*.yaml"))
        if path.name not in ("kustomization.yaml", "node.yaml")
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    example_docs = [
        (path, doc)
        for path in sorted(EXAMPLES.rglob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if doc
    ]
    for i, (path, doc) in enumerate([*k8s_docs(), *overlay_docs, *example_docs]):
        if doc["kind"] in CRD_KINDS:
            continue
        single = tmp_path / f"{i:02d}-{path.stem}-{doc['kind'].lower()}.yaml"
        single.write_text(yaml.safe_dump(doc), encoding="utf-8")
        files.append(str(single))
    assert len(files) >= 7
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    if version:
        cmd += ["-k", version]
    result = run([*cmd, *files])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


def test_k8s_servicemonitor_shape() -> None:
    sm = k8s("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"].get("release"), "kube-prometheus-stack selects on release"
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    ops = k8s("Service", "affinity-node-ops")
    api = k8s("Service", "affinity-node")
    selector = sm["spec"]["selector"]["matchLabels"].items()
    assert selector <= ops["metadata"]["labels"].items()
    assert not selector <= api["metadata"]["labels"].items(), "the API Service is not scraped"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in ops["spec"]["ports"]}
    assert set(endpoint) <= {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "scheme",
        "relabelings",
        "metricRelabelings",
        "honorLabels",
    }


def test_k8s_deployment_contract(tmp_path: Path) -> None:
    dep = k8s("Deployment", "affinity-node")
    cfg = load_node_config(k8s_node_yaml(), tmp_path, "k8s.yaml")
    spec = dep["spec"]
    # The HPA owns the count: a `replicas` here would reset the fleet on every apply.
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # Pods never run DDL: no migration init container (the Job does it with its own role).
    assert "initContainers" not in pod
    node = container(pod, "node")
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"http": cfg.listen.port, "ops": cfg.listen.ops_port}
    assert node["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert node["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert node["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    args = node["args"]
    assert args[:2] == ["serve", "--config"]
    mount = next(m for m in node["volumeMounts"] if args[2].startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (generator,) = kustomization(K8S)["configMapGenerator"]
    assert volume["configMap"]["name"] == generator["name"]
    assert args[2].rsplit("/", 1)[1] == generator["files"][0].split("=")[0]
    build_parser().parse_args(args)
    for c in [*pod["containers"], *pod.get("initContainers", [])]:
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert len(pod["topologySpreadConstraints"]) >= 1
    for tsc in pod["topologySpreadConstraints"]:
        assert tsc["labelSelector"]["matchLabels"].items() <= labels.items()
    env = {e["name"]: e for e in node["env"]}
    assert env["AFFINITY_DATABASE_DSN"]["valueFrom"]["secretKeyRef"]["name"] == "affinity-node-db"


def test_k8s_objects_point_at_each_other() -> None:
    dep = k8s("Deployment", "affinity-node")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    node = container(dep["spec"]["template"]["spec"], "node")
    svc = k8s("Service", "affinity-node")
    assert svc["spec"]["selector"].items() <= labels.items()
    # The Service exposes the API only.
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["targetPort"] == "http"
    ops = k8s("Service", "affinity-node-ops")
    assert ops["spec"]["clusterIP"] == "None"
    assert ops["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in ops["spec"]["ports"]] == ["ops"]
    assert {"http", "ops"} <= {p["name"] for p in node["ports"]}
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert any(m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    job = k8s("Job")
    job_pod = job["spec"]["template"]["spec"]
    (migrate,) = job_pod["containers"]
    assert migrate["args"] == ["migrate"]
    build_parser().parse_args(migrate["args"])
    assert migrate["image"] == node["image"]
    # The migration has its own role and Secret; the serving role never gets DDL rights.
    job_env = {e["name"]: e for e in migrate["env"]}
    node_env = {e["name"]: e for e in node["env"]}
    secret_of = {
        "job": job_env["AFFINITY_DATABASE_DSN"]["valueFrom"]["secretKeyRef"]["name"],
        "node": node_env["AFFINITY_DATABASE_DSN"]["valueFrom"]["secretKeyRef"]["name"],
    }
    assert secret_of == {"job": "affinity-node-migrate-db", "node": "affinity-node-db"}


def test_k8s_dashboard_configmaps_embed_the_current_json() -> None:
    gen = gen_dashboards()
    files = gen.dashboard_files()
    if not files:
        pytest.skip(f"grafana/dashboards/*.json: {OTHERS}")
    output = K8S / "grafana-dashboards.yaml"
    assert output.exists(), "run python deploy/k8s/gen_dashboards.py"
    if output.read_text() != gen.render(files):  # no 60 kB diff: the fix is one command
        pytest.fail(f"{output.relative_to(REPO)} is stale: run python deploy/k8s/gen_dashboards.py")
    docs = [d for d in yaml.safe_load_all(output.read_text()) if d]
    assert len(docs) == len(files)
    for doc, path in zip(docs, files, strict=True):
        assert doc["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert doc["data"] == {path.name: path.read_text()}
    assert output.name in kustomization(K8S)["resources"]


def test_dashboard_generator_output_is_valid_yaml(tmp_path: Path) -> None:
    """The generator itself, on a made-up dashboard (runs before the real ones exist)."""
    gen = gen_dashboards()
    sample = tmp_path / "Affinity Overview.json"
    sample.write_text('{\n  "title": "x",\n  "panels": [ ]  \n}\n', encoding="utf-8")
    (doc,) = yaml.safe_load_all(gen.render([sample]))
    assert doc["metadata"]["name"] == "affinity-node-dashboard-affinity-overview"
    assert doc["data"] == {sample.name: sample.read_text()}
    kustomization = tmp_path / "kustomization.yaml"
    kustomization.write_text("kind: Kustomization\nresources:\n  - a.yaml\nimages: []\n")
    assert gen.ensure_listed(kustomization, "grafana-dashboards.yaml")
    assert not gen.ensure_listed(kustomization, "grafana-dashboards.yaml")
    assert yaml.safe_load(kustomization.read_text())["resources"] == [
        "a.yaml",
        "grafana-dashboards.yaml",
    ]


def test_readme_documents_the_commands_it_relies_on() -> None:
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    for needle in (
        "docker compose up",
        "docker compose config",
        "keys create",
        "kubectl apply -k deploy/k8s",
        "PgBouncer",
        "target_session_attrs=read-write",
        "affinity-node bench",
        "--scale node=",
        # install, upgrade (drain) and rollback, with the roles and the timeout relation
        "### Install",
        "### Upgrade (a rollout drains)",
        "### Rollback",
        "kubectl -n affinity rollout undo deployment/affinity-node",
        "deploy/postgres/roles.sql",
        "affinity-node-migrate-db",
        "## Timeouts and drain",
        "edit-last-applied",
    ):
        assert needle in text, needle


def example(kind: str) -> dict[str, Any]:
    (doc,) = [
        d
        for path in sorted(EXAMPLES.rglob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if d and d["kind"] == kind
    ]
    return doc


def test_ingress_examples_are_sse_safe_and_wait_for_a_whole_generation(tmp_path: Path) -> None:
    """No buffering (chunks pass as they come), waits as long as the node's generation
    timeout (vLLM is silent until a non-streamed answer ends), the node's body limit."""
    prod = load_node_config((OVERLAYS["prod"] / "node.yaml").read_text(), tmp_path, "prod.yaml")
    generation = prod.limits.generation_timeout_seconds
    api = k8s("Service", "affinity-node")
    (api_port,) = api["spec"]["ports"]
    ingress = example("Ingress")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"
    assert notes[prefix + "proxy-request-buffering"] == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= generation
    assert int(notes[prefix + "proxy-send-timeout"]) >= generation
    assert notes[prefix + "proxy-body-size"] == f"{prod.limits.max_body_bytes // 2**20}m"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    assert path["backend"]["service"] == {"name": "affinity-node", "port": {"name": "http"}}
    assert api_port["name"] == "http"
    route = example("HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "affinity-node", "port": api_port["port"]}]
    assert rule["timeouts"]["request"] == "0s"  # no cap on a whole stream
    assert rule["timeouts"]["backendRequest"] == f"{generation:g}s"


def test_resources_request_cpu_without_a_limit_and_cap_memory() -> None:
    """One event loop: a CPU limit only throttles it (stalls streams); memory is capped (the
    cache holds the whole table), and the HPA keeps CPU with in-flight as an option."""
    dep = k8s("Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert "cpu" in resources["requests"] and "cpu" not in resources.get("limits", {})
    assert resources["limits"]["memory"] and resources["requests"]["memory"]
    hpa = k8s("HorizontalPodAutoscaler")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "affinity_inflight_requests" in (K8S / "hpa.yaml").read_text(encoding="utf-8")


def test_prod_overlay_deploys_by_digest() -> None:
    prod = kustomization(OVERLAYS["prod"])
    (image,) = prod["images"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image["digest"]), image
    assert "newTag" not in image


def test_the_keys_job_reads_its_dsn_from_a_mounted_secret_and_verifies_the_server() -> None:
    """No DSN in a pod spec or on a command line: the file of a mounted Secret
    (AFFINITY_DATABASE_DSN_FILE), TLS checked against a mounted CA (sslmode=verify-full); the
    Deployment patch that deploy/README.md gives has the same mounts."""
    pod = example("Job")["spec"]["template"]["spec"]
    (keys,) = pod["containers"]
    assert keys["args"][:2] == ["keys", "create"]
    build_parser().parse_args(keys["args"])
    env = {e["name"]: e for e in keys["env"]}
    assert "AFFINITY_DATABASE_DSN" not in env
    mounts = {m["mountPath"]: m["name"] for m in keys["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def secret_holding(path: str) -> dict[str, Any]:
        secret: dict[str, Any] = volumes[mounts[path.rsplit("/", 1)[0]]]["secret"]
        assert secret["defaultMode"] & 0o040, "readable by the pod's fsGroup"
        return secret

    dsn_file = env["AFFINITY_DATABASE_DSN_FILE"]["value"]
    assert secret_holding(dsn_file)["secretName"].endswith("-db")
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    (dsn,) = re.findall(
        r"--from-literal=dsn='(postgresql://[^']*sslmode=verify-full[^']*)'", readme
    )
    query = dict(p.split("=", 1) for p in urlsplit(dsn).query.split("&"))
    assert secret_holding(query["sslrootcert"])["secretName"] == "postgres-ca"
    (patch_text,) = re.findall(
        r"```yaml\n(# spec.template.spec of the Deployment\n.*?)```", readme, re.S
    )
    patch = yaml.safe_load(patch_text)
    (node,) = patch["containers"]
    assert node["volumeMounts"] == keys["volumeMounts"]
    assert {"name": "AFFINITY_DATABASE_DSN_FILE", "value": dsn_file} in node["env"]
    assert {v["name"] for v in patch["volumes"]} == set(volumes)


def test_cloudnativepg_example_pools_in_transaction_mode_and_listens_direct(
    tmp_path: Path,
) -> None:
    """CRDs kubernetes-validate has no schema for: their YAML and shape, and the wiring the
    README gives (pool through the Pooler, LISTEN and migrations on the -rw Service, the
    statement cache off), through the node's own loader and the Deployment's env names."""
    cluster, pooler = example("Cluster"), example("Pooler")
    assert cluster["apiVersion"] == pooler["apiVersion"] == "postgresql.cnpg.io/v1"
    assert cluster["spec"]["instances"] >= 3  # a primary and standbys to fail over to
    assert pooler["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert pooler["metadata"]["name"] != cluster["metadata"]["name"]
    assert pooler["spec"]["type"] == "rw"
    assert pooler["spec"]["pgbouncer"]["poolMode"] == "transaction"
    assert cluster["spec"]["bootstrap"]["initdb"]["owner"] == "affinity_migrator"
    managed = {r["name"] for r in cluster["spec"]["managed"]["roles"]}
    assert {"affinity_node", "affinity_admin"} <= managed
    init_sql = " ".join(cluster["spec"]["bootstrap"]["initdb"]["postInitApplicationSQL"])
    assert "affinity_node SET statement_timeout" in init_sql
    assert "affinity_node SET lock_timeout" in init_sql

    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Postgres on Kubernetes with CloudNativePG", 1)[1]
    command = section.split("secret generic affinity-node-db", 1)[1].split("kubectl", 1)[0]
    rw, pool = f"{cluster['metadata']['name']}-rw", pooler["metadata"]["name"]
    secret = {
        m.group(1): m.group(2).replace("${NODE_PW}", "pw")
        for m in re.finditer(r'--from-literal=(\w+)="?([^"\s]*)"?', command)
    }
    assert f"@{pool}:5432/" in secret["dsn"], secret
    assert f"@{rw}:5432/" in secret["listen_dsn"] and "read-write" in secret["listen_dsn"]
    assert secret["statement_cache"] == "false"
    dep = k8s("Deployment", "affinity-node")
    env = {e["name"]: e for e in container(dep["spec"]["template"]["spec"], "node")["env"]}
    wired = {
        name: env[name]["valueFrom"]["secretKeyRef"]["key"]
        for name in (
            "AFFINITY_DATABASE_DSN",
            "AFFINITY_DATABASE_LISTEN_DSN",
            "AFFINITY_DATABASE_STATEMENT_CACHE",
        )
    }
    path = tmp_path / "node.yaml"
    path.write_text(k8s_node_yaml(), encoding="utf-8")
    cfg = load_config(path, env={name: secret[key] for name, key in wired.items()})
    assert cfg.database.dsn == secret["dsn"]
    assert cfg.database.listen_dsn == secret["listen_dsn"]
    assert cfg.database.statement_cache is False

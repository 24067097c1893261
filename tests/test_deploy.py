"""The deployment files agree with the code: compose, Kubernetes, Prometheus, Grafana.

No container engine runs here, so the files are checked for structure and against the real
code: every loadcast command line is parsed by the ``loadcast`` CLI itself, every
environment is rendered through ``load_settings``, every metric and label a dashboard or the
README names is registered by the code, and every dashboard SQL query runs against an
embedded chDB carrying the sink's schema (``sinks.ddl.migrate``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml

from loadcast.cli import app
from loadcast.settings import Settings, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.kafka.yml"
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"

# Variables outside the settings model that loadcast reads (streams.metrics, loadcast.demo).
EXTRA_ENV = {"LOADCAST_CONFIG", "LOADCAST_METRICS_HOST", "LOADCAST_DATA_DIR"}
# Roles: sub-command -> the setting (section, field) of the port it serves /metrics on.
METRICS_PORT = {"worker": ("processor", "metrics_port"), "agent": ("agent", "metrics_port"),
                "sink": ("sink", "metrics_port"), "coordinator": ("federated", "metrics_port"),
                "planner": ("mirror", "planner_metrics_port"),
                "executor": ("mirror", "executor_metrics_port"),
                "sidecar": ("sidecar", "admin_port"), "api": ("api", "port"),
                "tasks": ("tasks", "metrics_port"), "swarm-worker": ("swarm", "metrics_port")}
ROLES = {"topics", "worker", "sink", "sidecar", "agent", "coordinator", "api", "tasks",
         "swarm-worker"}
# readiness: the HTTP services' own health answer; every other process: its /metrics
HEALTH_PATH = {"sidecar": "/health", "api": "/health", "tasks": "/healthz"}
MIRROR_ROLES = {"planner", "executor", "bundle"}
THIRD_PARTY_METRICS = {  # kafka-exporter (danielqsj/kafka-exporter), Prometheus itself
    "kafka_consumergroup_lag": {"consumergroup", "topic", "partition"},
    "kafka_consumergroup_lag_sum": {"consumergroup", "topic"},
    "kafka_topic_partition_current_offset": {"topic", "partition"},
    "up": set(),
}
ALWAYS_LABELS = {"instance", "job"}


# --------------------------------------------------------------------------- helpers


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``.

    >>> interpolate("${A:-x}-${B}-$$", {"B": "b"})
    'x-b-$'
    """
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        have = env.get(name)
        if op == ":-":
            return have if have else default
        if op == "-":
            return have if have is not None else default
        if op in (":?", "?"):
            if not have:
                raise AssertionError(f"${{{name}}} is required: {default}")
            return have
        return have or ""

    return _VAR.sub(sub, value)


def service_env(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v), {}) for k, v in env.items()}


def settings_env_problems(env: Mapping[str, str]) -> list[str]:
    """Names of ``LOADCAST_*`` variables that ``load_settings`` would silently ignore."""
    problems = []
    for name in env:
        if not name.startswith("LOADCAST_") or name in EXTRA_ENV:
            continue
        parts = name[len("LOADCAST_"):].lower().split("__")
        section = Settings.model_fields.get(parts[0])
        if len(parts) < 2 or section is None:
            problems.append(f"{name}: no settings section {parts[0]!r}")
            continue
        model = section.annotation
        fields = getattr(model, "model_fields", {})
        if parts[1] not in fields:
            problems.append(f"{name}: {parts[0]} has no field {parts[1]!r}")
    return problems


def render_settings(env: Mapping[str, str], config: Path | None,
                    monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with exactly ``env`` (and settings file ``config``) loads."""
    for k in list(os.environ):
        if k.startswith("LOADCAST_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        if k != "LOADCAST_CONFIG":
            monkeypatch.setenv(k, v)
    problems = settings_env_problems(env)
    assert not problems, problems
    try:
        return load_settings(config)
    except SettingsError as e:
        raise AssertionError(f"settings do not load: {e}") from None


@cache
def root_command() -> Any:
    return typer.main.get_command(app)


def parse_cli(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(sub-command path, its parsed options) of ``loadcast ARGS``, parsed by the real CLI.

    Raises AssertionError naming the problem (unknown command or option, bad value).
    """
    cmd, name, parent, rest = root_command(), "loadcast", None, list(args)
    path: list[str] = []
    try:
        while True:
            ctx = cmd.make_context(name, rest, parent=parent)
            if not hasattr(cmd, "resolve_command"):
                return path, dict(ctx.params)
            rest = [*ctx._protected_args, *ctx.args]
            name, cmd, rest = cmd.resolve_command(ctx, rest)
            path.append(name)
            parent = ctx
    except Exception as e:  # click's UsageError and friends (typer vendors click)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        raise AssertionError(f"`loadcast {' '.join(args)}`: {type(e).__name__}: {msg}") from None


def loadcast_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items()
            if (s.get("build") or {}).get("dockerfile") == "deploy/Dockerfile"}


def host_file(svc: Mapping[str, Any], container_path: str) -> Path:
    """The repository file a compose bind mount puts at ``container_path``."""
    for v in svc.get("volumes", []):
        src, _, rest = interpolate(v, {}).partition(":")
        dst = rest.split(":")[0]
        if dst == container_path:
            return (ROOT / src).resolve()
    raise AssertionError(f"nothing is mounted at {container_path}")


def compose_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    svc = compose()["services"][name]
    env = service_env(svc)
    config = host_file(svc, env["LOADCAST_CONFIG"]) if "LOADCAST_CONFIG" in env else None
    assert config is None or config.is_file(), config
    return render_settings(env, config, monkeypatch)


def health_url(check: Mapping[str, Any]) -> tuple[int, str]:
    """(port, path) a loadcast health check asks on loopback; its Python must compile."""
    test = check["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    compile(test[3], "<healthcheck>", "exec")
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", test[3])
    assert m, test
    return int(m.group(1)), m.group(2)


def host_of(hostport: str) -> str:
    return hostport.rsplit(":", 1)[0]


def metrics_port(s: Settings, role: str) -> int:
    section, field = METRICS_PORT[role]
    port = getattr(getattr(s, section), field)
    assert isinstance(port, int)
    return port


# --------------------------------------------------------------------------- compose


def test_cli_parser_rejects_what_loadcast_rejects() -> None:
    assert parse_cli(["--log-level", "INFO", "worker", "--metrics-port", "9100"]) == (
        ["worker"], {"bootstrap": None, "metrics_port": 9100, "log_level": None})
    assert parse_cli(["topics", "ensure"])[0] == ["topics", "ensure"]
    for bad in (["worker", "--no-such-option"], ["frobnicate"], ["agent", "--speedup", "-1"],
                ["sidecar", "--port", "70000"]):
        with pytest.raises(AssertionError):
            parse_cli(bad)


def test_settings_env_check_catches_names_load_settings_would_ignore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # load_settings ignores unknown LOADCAST_ variables, so the tests must catch typos.
    assert settings_env_problems({"LOADCAST_KAFKA__BOOTSTRAP_SERVER": "x",
                                  "LOADCAST_KAFKAS__PARTITIONS": "1"}) != []
    with pytest.raises(AssertionError, match=r"kafka\.partitions"):
        render_settings({"LOADCAST_KAFKA__PARTITIONS": "0"}, None, monkeypatch)


def test_compose_services_images_builds_and_commands() -> None:
    services = compose()["services"]
    ours = loadcast_services()
    assert set(ours) >= ROLES
    assert (ROOT / "deploy" / "Dockerfile").is_file()
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["loadcast"]' in dockerfile
    assert re.search(r"apt-get install[^\n]*haproxy", dockerfile)
    for name, svc in services.items():
        if name in ours:
            assert svc["build"]["context"] == "." and svc["image"].startswith("loadcast:")
            path, _ = parse_cli(svc["command"])
            assert path and path[0] in ROLES | MIRROR_ROLES, (name, path)
        else:
            image = svc.get("image", "")
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image!r}"
    # every role with the image it needs
    assert {parse_cli(s["command"])[0][0] for s in ours.values()} == ROLES | MIRROR_ROLES
    # mirroring needs a signing key the user makes: its services start only on request
    for name, svc in ours.items():
        if parse_cli(svc["command"])[0][0] in MIRROR_ROLES:
            assert svc.get("profiles") == ["mirrors"], name
    for image in ("apache/kafka:", "clickhouse/clickhouse-server:", "prom/prometheus:",
                  "grafana/grafana:"):
        assert any(s.get("image", "").startswith(image) for s in services.values()), image
    assert any("schema-registry" in s.get("image", "") or "karapace" in s.get("image", "")
               for s in services.values())


def test_compose_workers_scale_and_every_process_reads_the_same_settings() -> None:
    ours = loadcast_services()
    worker = compose()["services"]["worker"]
    # `--scale worker=N` needs no fixed name and no host port
    assert "container_name" not in worker and "ports" not in worker
    envs = {name: service_env(s) for name, s in ours.items()}
    first = next(iter(envs.values()))
    assert all(e == first for e in envs.values()), "loadcast services differ in settings env"
    for name, svc in ours.items():
        assert host_file(svc, first["LOADCAST_CONFIG"]) == (
            DEPLOY / "compose" / "loadcast.toml"), name


def test_compose_ports_dependencies_and_health_checks() -> None:
    services = compose()["services"]
    host_ports: dict[int, str] = {}
    for name, svc in services.items():
        for p in svc.get("ports", []):
            host, _, container = str(p).partition(":")
            assert host.isdigit() and container.isdigit(), (name, p)
            assert int(host) not in host_ports, f"{name} and {host_ports[int(host)]}: {host}"
            host_ports[int(host)] = name
        deps = svc.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health check"
            elif cond == "service_completed_successfully":
                assert services[dep].get("restart") in (None, "no", "on-failure"), dep
            else:
                assert cond == "service_started", (name, dep, cond)
    for name in ("kafka", "clickhouse", "schema-registry", "prometheus", "grafana"):
        assert "healthcheck" in services[name], name
    # start-up order: Kafka healthy and topics made before any loadcast process
    for name, svc in loadcast_services().items():
        if parse_cli(svc["command"])[0][0] == "bundle":
            continue  # the bundle store serves files; it needs no Kafka
        if name == "topics":
            assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
            continue
        assert svc["depends_on"]["kafka"]["condition"] == "service_healthy", name
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert services["sink"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_compose_kafka_is_kraft_and_matches_the_bootstrap_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kafka = service_env(compose()["services"]["kafka"])
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{kafka['KAFKA_NODE_ID']}@kafka:9093"
    assert "CONTROLLER://:9093" in kafka["KAFKA_LISTENERS"]
    s = compose_settings("worker", monkeypatch)
    assert f"PLAINTEXT://{s.kafka.bootstrap_servers}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    assert s.kafka.replication_factor <= int(kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"])
    # the three-node override: one cluster, every node a voter, replication 3
    override = yaml.safe_load((DEPLOY / "compose" / "kafka-3.yml").read_text())
    nodes = {n: service_env(svc) for n, svc in override["services"].items()}
    assert set(nodes) == {"kafka", "kafka-2", "kafka-3"}
    voters = {f"{e['KAFKA_NODE_ID']}@{n}:9093" for n, e in nodes.items()}
    for n, e in nodes.items():
        assert e["CLUSTER_ID"] == kafka["CLUSTER_ID"], n
        assert set(e["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters, n
        assert f"PLAINTEXT://{n}:9092" in e["KAFKA_ADVERTISED_LISTENERS"], n
        assert int(e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
    assert len({e["KAFKA_NODE_ID"] for e in nodes.values()}) == 3


def test_compose_settings_render_and_point_at_compose_services(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    for name, svc in loadcast_services().items():
        s = compose_settings(name, monkeypatch)
        for hp in s.kafka.bootstrap_servers.split(","):
            assert host_of(hp) in services, (name, hp)
        assert urlsplit(s.sink.dsn).hostname in services
        role = parse_cli(svc["command"])[0][0]
        if role in METRICS_PORT:
            assert metrics_port(s, role), f"{name}: no /metrics"
        # health checks ask the port the settings make the process listen on
        check = svc.get("healthcheck")
        if role == "topics":
            continue
        assert check is not None, name
        if role == "bundle":
            code = check["test"][3]
            compile(code, "<healthcheck>", "exec")
            assert f"('127.0.0.1', {s.mirror.serve_port})" in code
            assert s.mirror.serve_host == "0.0.0.0"
            assert urlsplit(s.mirror.store_url).hostname == name
            assert urlsplit(s.mirror.store_url).port == s.mirror.serve_port
            continue
        port, path = health_url(check)
        if role == "sidecar":
            assert (port, path) == (s.sidecar.admin_port, "/health")
        elif role == "api":
            assert (port, path) == (s.api.port, "/health") and s.api.listen_host == "0.0.0.0"
        elif role == "tasks":
            assert (port, path) == (s.tasks.port, "/healthz") and s.tasks.host == "0.0.0.0"
        elif role == "sink" and path == "/health":
            assert port == s.sink.admin_port and s.sink.admin_enabled
        else:
            assert (port, path) == (metrics_port(s, role), "/metrics")
    s = compose_settings("sidecar", monkeypatch)
    ports = {int(str(p).split(":")[1]) for p in services["sidecar"]["ports"]}
    assert ports == {s.sidecar.listen_port, s.sidecar.admin_port}
    assert s.sidecar.listen_host == "0.0.0.0" and s.sidecar.data_plane == "haproxy"
    ups = s.sidecar.resolved_upstreams()
    assert ups
    for u in ups:
        assert u.host in services, u
        assert str(u.port) in " ".join(services[u.host]["command"]), u
    # the edge agent replays the trace the tests use, as the sidecar's endpoints
    from tests.conftest import ELB

    agent = parse_cli(services["agent"]["command"])[1]
    assert Path(agent["replay"]).name == ELB.name
    region = compose_settings("agent", monkeypatch).agent.region
    assert {f"{agent['api']}-{region}-{i + 1}" for i in range(agent["endpoints"])} == {
        u.id for u in ups}


def test_prometheus_scrapes_every_loadcast_process(monkeypatch: pytest.MonkeyPatch) -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets: dict[str, int] = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for n in sd["names"]:
                targets[n] = sd["port"]
        for sc in job.get("static_configs", []):
            for t in sc["targets"]:
                targets[host_of(t)] = int(t.rsplit(":", 1)[1])
    services = compose()["services"]
    for name, svc in loadcast_services().items():
        role = parse_cli(svc["command"])[0][0]
        if role not in METRICS_PORT:
            continue
        s = compose_settings(name, monkeypatch)
        port = metrics_port(s, role)
        assert targets.get(name) == port, f"{name}: scraped on {targets.get(name)}, serves {port}"
        assert service_env(svc)["LOADCAST_METRICS_HOST"] == "0.0.0.0"
    assert "kafka-exporter" in targets and "kafka-exporter" in services
    # Grafana is provisioned with both data sources and the dashboards
    grafana = services["grafana"]
    assert host_file(grafana, "/etc/grafana/provisioning") == DEPLOY / "grafana" / "provisioning"
    assert host_file(grafana, "/var/lib/grafana/dashboards") == DASHBOARDS
    assert "grafana-clickhouse-datasource" in service_env(grafana)["GF_INSTALL_PLUGINS"]


# --------------------------------------------------------------------------- metrics


@cache
def registered_metrics() -> dict[str, set[str]]:
    """Every sample name loadcast's modules register -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(|SCRAPED_METRICS")
    out: dict[str, set[str]] = {}
    for pkg in ("loadcast", "streams", "processors", "sinks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            if "prometheus_client" not in text or not pattern.search(text):
                continue
            module = importlib.import_module(
                ".".join(path.relative_to(ROOT).with_suffix("").parts))
            # Metrics a collector reads at scrape time (processors.apps.worker.SCRAPED_METRICS).
            for name in getattr(module, "SCRAPED_METRICS", {}):
                out[name] = set()
            for obj in vars(module).values():
                if not isinstance(obj, MetricWrapperBase):
                    continue
                name, kind, labels = obj._name, str(obj._type), set(obj._labelnames)
                suffixes = {"counter": ["_total"], "gauge": [""],
                            "histogram": ["_bucket", "_sum", "_count"],
                            "summary": ["_sum", "_count"]}[kind]
                for suffix in suffixes:
                    out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def test_metric_names_follow_the_pattern() -> None:
    names = registered_metrics()
    assert len(names) > 40
    pattern = re.compile(r"^loadcast_(agent|producer|consumer|processor|coordinator|sink|"
                         r"sidecar|[a-z]+)_[a-z0-9_]+$")
    for name in names:
        assert pattern.match(name), name
    assert "loadcast_sink_dead_letters_total" in names
    assert "loadcast_processor_dead_letters_total" in names


_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "irate", "by", "without", "on",
    "ignoring", "group_left", "group_right", "histogram_quantile", "and", "or", "unless",
    "offset", "bool", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "delta", "deriv",
}


def promql_problems(expr: str) -> list[str]:
    """Metric and label names in ``expr`` that nothing exports."""
    known = {**registered_metrics(), **THIRD_PARTY_METRICS}
    stripped = re.sub(r'"[^"]*"', '""', expr)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    metrics = [w for w in re.findall(r"\b[a-z_][a-z0-9_]*\b(?=\s*(?:\{|\)|$|\[|\s))",
                                     stripped) if w not in _PROMQL_WORDS]
    problems = [f"unknown metric {m}" for m in metrics
                if (m.startswith(("loadcast_", "kafka_")) or m == "up") and m not in known]
    used = [m for m in metrics if m in known]
    if not used:
        return [*problems, f"no known metric in {expr!r}"]
    allowed = set().union(*(known[m] for m in used)) | ALWAYS_LABELS
    labels = re.findall(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"", expr)
    for clause in re.findall(r"\b(?:by|on|without|ignoring)\s*\(([^)]*)\)", expr):
        labels += [x.strip() for x in clause.split(",") if x.strip()]
    problems += [f"label {lab} not on {used}" for lab in labels if lab not in allowed]
    return problems


def test_promql_checker_catches_wrong_names() -> None:
    assert promql_problems("sum by (topic) (rate(loadcast_producer_records_total[1m]))") == []
    assert promql_problems("rate(loadcast_producer_records_totl[1m])")
    assert promql_problems("sum by (endpoint) (rate(loadcast_producer_records_total[1m]))")
    assert promql_problems('loadcast_sink_lag_records{table="x"}')


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert len(files) >= 4
    return files


def panels(dash: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def test_dashboards_reference_existing_metrics_and_data_sources() -> None:
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "loadcast.yml").read_text())
    uids = {d["uid"]: d["type"] for d in ds["datasources"]}
    assert set(uids.values()) == {"prometheus", "grafana-clickhouse-datasource"}
    titles = []
    exprs = 0
    for f in dashboard_files():
        dash = json.loads(f.read_text())
        titles.append(dash["title"])
        ids = [p["id"] for p in panels(dash)]
        assert len(ids) == len(set(ids)), f.name
        for p in panels(dash):
            if p["type"] == "row":
                continue
            for t in p["targets"]:
                assert uids[t["datasource"]["uid"]] == t["datasource"]["type"], f.name
                if "expr" in t:
                    exprs += 1
                    assert promql_problems(t["expr"]) == [], (f.name, p["title"], t["expr"])
    assert exprs > 30
    joined = " ".join(titles).lower()
    for topic in ("pipeline", "forecast vs actual", "routing", "mirrors"):
        assert topic in joined, topic
    pipeline = (DASHBOARDS / "pipeline-health.json").read_text()
    for needle in ("kafka_consumergroup_lag", "loadcast_sink_lag_records", "dead_letters_total",
                   "rate(loadcast_processor_windows_total"):
        assert needle in pipeline, needle


def test_dashboards_are_generated_from_make_dashboards() -> None:
    out = subprocess.run([sys.executable, str(DEPLOY / "grafana" / "make_dashboards.py"),
                          "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def grafana_sql(dash: Mapping[str, Any]) -> list[str]:
    queries = [t["rawSql"] for p in panels(dash) for t in p.get("targets", []) if "rawSql" in t]
    queries += [v["query"] for v in dash["templating"]["list"]
                if v["type"] == "query" and v["datasource"]["uid"] == "clickhouse"]
    return queries


def substitute_grafana(sql: str) -> str:
    """Grafana variables and ClickHouse-plugin macros -> literal SQL chDB can run."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 r"(\1 >= now() - INTERVAL 1 DAY AND \1 <= now())", sql)
    sql = sql.replace("${endpoint:singlequote}", "'orders-central-1'")
    sql = sql.replace("${api:singlequote}", "'orders'").replace("${horizon}", "1")
    assert "$" not in sql, f"unhandled Grafana macro or variable in {sql}"
    return sql


_RUN_SQL = """
import json, sys
from sinks.db import connect
from sinks.ddl import migrate
from sinks.settings import SinkSettings
client = connect(SinkSettings(dsn="chdb://" + sys.argv[1]))
migrate(client, 30)
errors = []
for q in json.load(sys.stdin):
    try:
        client.query(q)
    except Exception as e:
        errors.append([q, str(e)[:400]])
print(json.dumps(errors))
"""


def test_dashboard_sql_runs_against_the_sink_schema(tmp_path: Path) -> None:
    queries = []
    for f in dashboard_files():
        queries += [substitute_grafana(q) for q in grafana_sql(json.loads(f.read_text()))]
    assert len(queries) >= 15
    # In a child process: an embedded chDB engine is one per process.
    out = subprocess.run([sys.executable, "-c", _RUN_SQL, str(tmp_path / "ch")],
                         input=json.dumps(queries), capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors == [], json.dumps(errors, indent=1)


def test_readme_metrics_table_lists_every_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(loadcast_\w+)` \| ([^|]*) \|", section, re.M)
    listed = {name: {x.strip() for x in labels.split(",") if x.strip()} for name, labels in rows}
    known = {n: labels - {"le"} for n, labels in registered_metrics().items()
             if not n.endswith(("_sum", "_count"))}
    known = {n.removesuffix("_bucket"): labels for n, labels in known.items()}
    assert set(listed) == set(known), {"missing": set(known) - set(listed),
                                       "unknown": set(listed) - set(known)}
    for name, labels in listed.items():
        assert labels == known[name], (name, labels, known[name])


# --------------------------------------------------------------------------- kubernetes


@cache
def k8s_objects() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk, "every manifest in kustomization.yaml, and only those"
    objs = []
    for name in listed:
        for doc in load_yaml_docs(K8S / name):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
            objs.append(doc)
    return objs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def pod_env(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(by_kind("ConfigMap")[src["configMapRef"]["name"]]["data"])
        else:
            env.update(by_kind("Secret")[src["secretRef"]["name"]]["stringData"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return {k: str(v) for k, v in env.items()}


def pod_settings(pod: Mapping[str, Any], container: Mapping[str, Any], tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> Settings:
    env = pod_env(pod, container)
    config = None
    if "LOADCAST_CONFIG" in env:
        path = env["LOADCAST_CONFIG"]
        mount = next(m for m in container["volumeMounts"]
                     if m["mountPath"] in (path, str(Path(path).parent)))
        vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        data = by_kind("ConfigMap")[vol["configMap"]["name"]]["data"]
        config = tmp_path / "loadcast.toml"
        config.write_text(data[mount.get("subPath", Path(path).name)])
    return render_settings(env, config, monkeypatch)


def loadcast_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, dep in by_kind("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"] == "loadcast":
                yield name, pod, c


def test_k8s_manifests_use_real_commands_settings_and_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    roles = set()
    configmaps, secrets = by_kind("ConfigMap"), by_kind("Secret")
    envs = []
    for name, pod, c in loadcast_containers():
        dep = by_kind("Deployment")[name]
        assert dep["spec"]["selector"]["matchLabels"].items() <= (
            dep["spec"]["template"]["metadata"]["labels"].items())
        path, _ = parse_cli(c["args"])
        role = path[0]
        roles.add(role)
        envs.append(pod_env(pod, c))
        for src in c.get("envFrom", []):
            ref = src.get("configMapRef") or src.get("secretRef")
            assert ref["name"] in (configmaps if "configMapRef" in src else secrets), ref
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            vol = volumes[m["name"]]
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps
            if "secret" in vol:
                assert vol["secret"]["secretName"] in secrets
        s = pod_settings(pod, c, tmp_path, monkeypatch)
        port = metrics_port(s, role)
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port, name
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert port in named.values(), name
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                if role == "tasks":  # its health is on the API's port, /metrics apart
                    assert named.get(get["port"]) == s.tasks.port, (name, probe)
                else:
                    assert named.get(get["port"], get["port"]) == port, (name, probe)
                assert get["path"] == HEALTH_PATH.get(role, "/metrics"), (name, probe)
        assert s.processor.metrics_port and s.agent.metrics_port
    assert roles == ROLES - {"topics"} | {"planner"}
    # every pod reads the same settings; only the planner also gets the signing key
    key = secrets["loadcast-signing-key"]["stringData"]
    assert set(key) == {"LOADCAST_MIRROR__SIGNING_KEY"}
    common = [{k: v for k, v in e.items() if k not in key} for e in envs]
    assert all(e == common[0] for e in common), "loadcast pods differ in settings env"
    assert envs[0]["LOADCAST_METRICS_HOST"] == "0.0.0.0"
    with_key = {n for n, pod, c in loadcast_containers()
                if any(s.get("secretRef", {}).get("name") == "loadcast-signing-key"
                       for s in c.get("envFrom", []))}
    assert with_key == {"loadcast-planner"}


def test_k8s_kustomization_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in k8s_objects())
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "loadcast", d["metadata"]
        if d["kind"] == "Deployment":
            images = [c["image"] for c in d["spec"]["template"]["spec"]["containers"]]
            assert all(":" in i for i in images), images  # `images:` pinned a tag


def test_k8s_workers_scale_on_their_consumer_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streams.kafka.topics import topic_name

    (scaled,) = by_kind("ScaledObject").values()
    target = scaled["spec"]["scaleTargetRef"]["name"]
    dep = by_kind("Deployment")[target]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert parse_cli(c["args"])[0] == ["worker"]
    s = pod_settings(pod, c, tmp_path, monkeypatch)
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == s.kafka.bootstrap_servers
    assert meta["consumerGroup"] == s.processor.app_id  # the Faust app id is the group id
    assert meta["topic"] == topic_name(s.kafka, "telemetry")
    assert int(meta["lagThreshold"]) > 0
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= s.kafka.partitions


def test_k8s_sidecar_pod_runs_haproxy_the_sidecar_can_drive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from streams.sidecar.haproxy import backend_name
    from streams.sidecar.proxy import API_HEADER, DYNAMIC_HEADER

    dep = by_kind("Deployment")["loadcast-sidecar"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    s = pod_settings(pod, c, tmp_path, monkeypatch)
    assert s.sidecar.data_plane == "haproxy" and s.sidecar.haproxy_socket is not None
    (haproxy,) = [i for i in pod["initContainers"] if i["name"] == "haproxy"]
    assert haproxy["restartPolicy"] == "Always"  # a native sidecar: up before loadcast
    assert haproxy["image"].startswith("haproxy:")
    volumes = {v["name"]: v for v in pod["volumes"]}
    sock_dir = str(s.sidecar.haproxy_socket.parent)
    shared = [m["name"] for m in c["volumeMounts"] if m["mountPath"] == sock_dir]
    assert shared and "emptyDir" in volumes[shared[0]]
    assert any(m["name"] == shared[0] and m["mountPath"] == sock_dir
               for m in haproxy["volumeMounts"])
    cfg_mount = next(m for m in haproxy["volumeMounts"] if "haproxy" in m["mountPath"]
                     and m["name"] != shared[0])
    cfg_map = by_kind("ConfigMap")[volumes[cfg_mount["name"]]["configMap"]["name"]]
    cfg = cfg_map["data"]["haproxy.cfg"]
    assert f"{cfg_mount['mountPath']}/haproxy.cfg" in haproxy["args"]
    assert re.search(rf"stats socket {re.escape(str(s.sidecar.haproxy_socket))} .*level admin",
                     cfg)
    assert f"bind 0.0.0.0:{s.sidecar.listen_port}" in cfg
    assert API_HEADER in cfg and DYNAMIC_HEADER in cfg
    sections = {m.group(1): m.group(2) for m in
                re.finditer(r"^backend (\S+)\n((?:[ \t]+.*\n?)*)", cfg, re.M)}
    ups = s.sidecar.resolved_upstreams()
    assert ups
    for u in ups:
        for b in (backend_name(u.api), backend_name(u.api) + "_first"):
            assert re.search(rf"^\s+server {re.escape(u.id)} {re.escape(u.host)}:{u.port} ",
                             sections.get(b, ""), re.M), (b, u.id)
    # the Service reaches the data plane and the admin port by the pod's port names
    svc = by_kind("Service")["loadcast-sidecar"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    names = {p["name"]: p["containerPort"] for x in (*pod["containers"], haproxy)
             for p in x.get("ports", [])}
    targets = {p["targetPort"] for p in svc["spec"]["ports"]}
    assert targets <= set(names)
    assert {names[t] for t in targets} == {s.sidecar.listen_port, s.sidecar.admin_port}


def test_k8s_forecast_scaledobject_example_reaches_the_api_scaler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from processors.autoscaling import parse_metadata

    (scaled,) = load_yaml_docs(K8S / "examples" / "orders-forecast-scaledobject.yaml")
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "external"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
    q = parse_metadata(meta)  # what the scaler will accept (MetadataError otherwise)
    assert q.band == "upper" and q.lead_seconds > 0 and q.target_per_replica > 0
    # scalerAddress = the loadcast-api Service's grpc port, which reaches the scaler's port
    host, port = meta["scalerAddress"].rsplit(":", 1)
    svc = by_kind("Service")[host.split(".")[0]]
    assert host.split(".")[1] == "loadcast"  # the kustomization's namespace
    (grpc_port,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    dep = by_kind("Deployment")[svc["metadata"]["name"]]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert parse_cli(c["args"])[0] == ["api"]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    s = pod_settings(pod, c, tmp_path, monkeypatch)
    assert s.api.keda_enabled and s.api.listen_host == "0.0.0.0"
    assert named[grpc_port["targetPort"]] == s.api.resolved_keda_port()


# --------------------------------------------------------------------------- README


def test_readme_run_on_a_cluster_and_the_two_worker_test(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n## Run on a cluster" in readme
    section = readme.split("\n## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    for needle in ("docker-compose.kafka.yml", "--scale worker=", "deploy/k8s",
                   "LOADCAST_KAFKA__BOOTSTRAP_SERVERS", "LOADCAST_KAFKA__SECURITY_PROTOCOL",
                   "LOADCAST_SINK__DSN", "tests/test_worker.py::"
                   "test_two_workers_share_and_survive_a_rebalance"):
        assert needle in section, needle
    for var in set(re.findall(r"\bLOADCAST_[A-Z_]+(?:__[A-Z_]+)?\b", section)):
        assert not settings_env_problems({var: ""}), var
    commands = 0
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = line.split("#")[0].replace("&", " ").split()
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words.pop(0)  # VAR=value prefixes
            if words and words[0] in ("loadcast", ".venv/bin/loadcast"):
                parse_cli(words[1:])
                commands += 1
    assert commands >= 5
    # The referenced test: real `python -m loadcast worker` processes configured only by
    # LOADCAST_* environment variables, read by load_settings (the production path).
    from streams.kafka.settings import KafkaSettings
    from tests import test_worker, worker_helpers

    assert callable(test_worker.test_two_workers_share_and_survive_a_rebalance)
    src = inspect.getsource(worker_helpers.start_worker)
    assert '[sys.executable, "-m", "loadcast", "worker"]' in src
    assert "env=worker_env(" in src
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:1234", topic_prefix="t.", partitions=4)
    env = {k: v for k, v in worker_helpers.worker_env(kafka, "proc-x").items()
           if k.startswith("LOADCAST_")}
    s = render_settings(env, None, monkeypatch)
    assert (s.kafka.bootstrap_servers, s.kafka.topic_prefix, s.processor.app_id) == (
        "127.0.0.1:1234", "t.", "proc-x")

"""One consistent CLI: what a new user tripped over (issue 14, item 5)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from loadcast.cli import app
from loadcast.cli.options import faust_loglevel
from streams.sidecar.config import load_upstreams
from tests.test_deploy import parse_cli

UPSTREAM = 'id = "orders-1"\nurl = "http://127.0.0.1:9001"\nregion = "eu-west"\napi = "orders"\n'


def commands() -> dict[str, Any]:
    """Every leaf command: 'topics list' -> click command."""
    out: dict[str, Any] = {}

    def walk(cmd: Any, path: list[str]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return out


@pytest.mark.parametrize("form", ["[[sidecar.upstreams]]", "[[upstreams]]"])
def test_upstreams_file_takes_the_readme_form_and_the_short_one(tmp_path: Path,
                                                                form: str) -> None:
    ups = tmp_path / "upstreams.toml"
    ups.write_text(f"{form}\n{UPSTREAM}")
    assert [(u.id, u.api, u.region) for u in load_upstreams(ups)] == [
        ("orders-1", "orders", "eu-west")]
    r = CliRunner().invoke(app, ["sidecar", "--no-kafka", "--upstreams", str(ups),
                                 "--port", "0", "--admin-port", "0", "--duration", "0.2"])
    assert r.exit_code == 0, r.output
    assert "1 upstreams" in " ".join(r.output.split())


def test_a_bad_upstreams_file_shows_the_expected_form(tmp_path: Path) -> None:
    ups = tmp_path / "upstreams.toml"
    ups.write_text('[sidecar]\nupstreams = "orders-1"\n')
    r = CliRunner().invoke(app, ["sidecar", "--no-kafka", "--upstreams", str(ups)])
    assert r.exit_code == 2
    assert "must be a list of upstream tables" in " ".join(r.output.split())
    assert "\n[[sidecar.upstreams]]\n" in r.output and '\nurl = "http://' in r.output


def test_each_query_help_lists_only_its_own_options() -> None:
    runner = CliRunner()
    own = {"mirror-lead-time": "--lookback", "anomalies": "--limit"}
    for name in ("latency", "forecast-accuracy", "routing-shares", "mirror-lead-time",
                 "anomalies", "dead-letter"):
        r = runner.invoke(app, ["query", name, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert "--since" in r.output and "--format" in r.output
        for query, option in own.items():
            assert (option in r.output) == (query == name), (name, option)


def test_log_level_is_one_option_before_or_after_the_command() -> None:
    for role in ("worker", "coordinator", "planner"):
        for args in (["--log-level", "warn", role], [role, "--log-level", "warn"],
                     ["--log-level", "INFO", role, "--log-level", "debug"]):
            parse_cli(args)
        with pytest.raises(AssertionError, match="log-level"):
            parse_cli([role, "--log-level", "loud"])
    r = CliRunner().invoke(app, ["--log-level", "loud", "topics", "list"])
    assert r.exit_code == 2 and "debug, info, warning (warn) or error" in r.output
    # After the command it sets Python logging too, and Faust's level.
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.WARNING)
        assert faust_loglevel(None) == "warn" and root.level == logging.WARNING
        assert faust_loglevel("Info") == "info" and root.level == logging.INFO
    finally:
        root.setLevel(before)


def test_bootstrap_is_accepted_by_every_command_that_talks_to_kafka() -> None:
    without = {name for name, cmd in commands().items()
               if "-b" not in {o for p in cmd.params for o in p.opts}}
    # Commands with no Kafka of their own (the broker and the demo start one).
    assert without == {"broker", "demo", "settings", "bundle push", "bundle serve",
                       "mirror keygen",
                       *(f"query {q}" for q in ("latency", "forecast-accuracy",
                                                "routing-shares", "mirror-lead-time",
                                                "anomalies", "dead-letter", "tasks"))}
    r = subprocess.run([sys.executable, "-m", "loadcast", "topics", "list", "-b",
                        "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loadcast.telemetry\t")


def test_compose_stack_uses_the_registry_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every loadcast service reads kafka.schema_registry_url = the compose registry, and
    nothing starts before the registry is healthy (all wait for `topics`, which waits)."""
    from tests.test_deploy import compose, compose_settings, loadcast_services

    services = compose()["services"]
    registry = services["schema-registry"]
    port = registry["environment"]["SCHEMA_REGISTRY_LISTENERS"].rsplit(":", 1)[1]
    for name in loadcast_services():
        s = compose_settings(name, monkeypatch)
        assert s.kafka.schema_registry_url == f"http://schema-registry:{port}", name
    topics = services["topics"]["depends_on"]
    assert topics["schema-registry"]["condition"] == "service_healthy"
    text = " ".join((Path(__file__).resolve().parents[1] / "docker-compose.kafka.yml")
                    .read_text().replace("#", " ").split())
    assert "keep the embedded schema ids" not in text and "Every loadcast process uses it" in text

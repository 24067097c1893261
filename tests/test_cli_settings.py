"""Settings and the command line: bad input stops with the field named; broker lifecycle."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from loadcast.settings import SettingsError, load_settings
from streams.kafka.settings import KafkaSettings
from streams.kafka.topics import CATALOG, ensure_topics, topic_name

LOADCAST = [sys.executable, "-m", "loadcast"]


def test_env_and_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[kafka]\nbootstrap_servers = "file:9092"\npartitions = 12\n'
                 '[agent]\nregion = "eu-west"\n')
    monkeypatch.setenv("LOADCAST_KAFKA__PARTITIONS", "24")
    s = load_settings(f)
    assert s.kafka.bootstrap_servers == "file:9092"  # from the file
    assert s.kafka.partitions == 24  # env beats file
    assert s.agent.region == "eu-west"


@pytest.mark.parametrize(
    ("text", "named"),
    [("[kafka]\npartitions = 0\n", "kafka.partitions"),
     ("[agent]\ninterval_seconds = 'soon'\n", "agent.interval_seconds"),
     ("[kafka]\nbootstrap = 'x'\n", "kafka.bootstrap"),
     ("[kafka\n", "s.toml")],
)
def test_bad_settings_file_names_the_field(tmp_path: Path, text: str, named: str) -> None:
    f = tmp_path / "s.toml"
    f.write_text(text)
    with pytest.raises(SettingsError, match=named.replace(".", r"\.")):
        load_settings(f)
    done = subprocess.run([*LOADCAST, "--config", str(f), "topics", "list"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and named in done.stderr


def test_missing_settings_file() -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings("/nonexistent/loadcast.toml")


def test_bad_cli_arguments_are_refused() -> None:
    done = subprocess.run([*LOADCAST, "agent", "--interval", "-3"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "--interval" in done.stderr
    done = subprocess.run([*LOADCAST, "agent", "--replay", "/nope.csv"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "/nope.csv" in done.stderr


def test_help_lists_the_commands() -> None:
    done = subprocess.run([*LOADCAST, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for cmd in ("broker", "agent", "topics", "demo"):
        assert cmd in done.stdout


def test_settings_command_lists_every_setting_its_variable_default_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from loadcast.cli import app
    from loadcast.settings import Settings

    f = tmp_path / "s.toml"
    f.write_text('[agent]\nregion = "eu-west"\nclient_hash_key = "s3cret"\n')
    monkeypatch.setenv("LOADCAST_KAFKA__PARTITIONS", "24")
    monkeypatch.setenv("LOADCAST_SINK__DSN", "http://loader:pw0rd@127.0.0.1:8123")
    r = CliRunner().invoke(app, ["--config", str(f), "settings"])
    assert r.exit_code == 0, r.output
    rows = {line.split("\t")[0]: line.split("\t") for line in r.stdout.splitlines()
            if not line.startswith("#")}
    assert rows.pop("setting") == ["setting", "env", "default", "value", "description"]
    # Every field of every section, and nothing else.
    assert set(rows) == {f"{section}.{name}" for section, field in Settings.model_fields.items()
                         for name in field.annotation.model_fields}  # type: ignore[union-attr]
    assert rows["kafka.partitions"][1:4] == ["LOADCAST_KAFKA__PARTITIONS", "6", "24"]
    assert rows["agent.region"][2:4] == ["central", "eu-west"]
    assert "s3cret" not in r.stdout and rows["agent.client_hash_key"][3] == "**********"
    assert "pw0rd" not in r.stdout and rows["sink.dsn"][3] == "http://loader:****@127.0.0.1:8123"
    assert "# [sidecar] streams.sidecar.config.SidecarSettings" in r.stdout
    only = CliRunner().invoke(app, ["settings", "sink"])
    assert only.exit_code == 0
    assert {line.split(".")[0] for line in only.stdout.splitlines()[1:]
            if not line.startswith("#")} == {"sink"}
    bad = CliRunner().invoke(app, ["settings", "kafak"])
    assert bad.exit_code == 2 and "no section kafak" in bad.output


def test_ensure_topics_is_idempotent_and_compacts_the_model_repository(
    kafka: KafkaSettings,
) -> None:
    again = ensure_topics(kafka)  # the fixture created them already
    assert set(again.values()) == {"exists"} and len(again) == len(CATALOG)
    admin = AdminClient(kafka.client_config())
    res = ConfigResource(ConfigResource.Type.TOPIC, topic_name(kafka, "global-model"))
    cfg = admin.describe_configs([res])[res].result(10)
    assert cfg["cleanup.policy"].value == "compact"


def test_broker_command_prints_address_and_stops_on_sigterm() -> None:
    p = subprocess.Popen([*LOADCAST, "broker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().strip()  # blocks until the broker answers metadata
        assert line.startswith("127.0.0.1:")
        md = AdminClient({"bootstrap.servers": line}).list_topics(timeout=10)
        assert "loadcast.telemetry" in md.topics
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        # The Tansu child is gone too: nothing listens on the port any more.
        time.sleep(0.5)
        import socket
        with pytest.raises(OSError), socket.create_connection(
            ("127.0.0.1", int(line.rsplit(":", 1)[1])), 1
        ):
            pass
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)



def test_broker_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A SIGKILLed process (a timed-out test, a killed demo) leaves no broker behind."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from streams.kafka.broker import EmbeddedBroker\n"
        "b = EmbeddedBroker().start()\n"
        "print(b.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(10)
    import psutil

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(child):
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE
    assert not alive, "the broker outlived its killed parent"

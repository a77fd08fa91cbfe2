"""Settings: a YAML file, then EXTPROC_* variables (as Kubernetes sets them: strings), then flags;
every bad value is refused at start with a message naming the key."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, load_settings


def test_environment_variables_are_typed_like_the_keys_they_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("grpc:\n  workers: 3\nmetrics:\n  prometheus: true\n")
    s = load_settings(cfg, environ={
        "EXTPROC_GRPC__WORKERS": "2",  # the variable wins over the file
        "EXTPROC_METRICS__PROMETHEUS": "off",
        "EXTPROC_METRICS__OTLP": "YES",
        "EXTPROC_METRICS__LABELS": "team, feature ,,env",
        "EXTPROC_ATTRIBUTION__HEADERS": "x-team=team, x-org=org",
        "EXTPROC_STORAGE__DSN": "https://clickhouse.example:8443/extproc",
        "OTHER_VARIABLE": "ignored",
    })
    assert s.grpc.workers == 2
    assert s.metrics.prometheus is False and s.metrics.otlp is True
    assert s.metrics.labels == ["team", "feature", "env"]
    assert s.attribution.headers == {"x-team": "team", "x-org": "org"}
    assert s.storage.dsn == "https://clickhouse.example:8443/extproc"
    # flags (overrides) win over both
    assert load_settings(cfg, {"grpc": {"workers": 4}}, environ={"EXTPROC_GRPC__WORKERS": "2"}).grpc.workers == 4


def test_the_config_file_can_come_from_extproc_config(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch:\n  flush_interval_ms: 250\n")
    assert load_settings(environ={"EXTPROC_CONFIG": str(cfg)}).batch.flush_interval_ms == 250


@pytest.mark.parametrize(("env", "message"), [
    ({"EXTPROC_GRPC__WORKERS": "two"}, "bad value for grpc.workers: 'two'"),
    ({"EXTPROC_METRICS__PROMETHEUS": "maybe"}, "bad value for metrics.prometheus: 'maybe'"),
    ({"EXTPROC_GRPC__NOPE": "1"}, "unknown config key grpc.nope"),
    ({"EXTPROC_NOPE": "1"}, "unknown config key nope"),
    ({"EXTPROC_GRPC": "x"}, "config key grpc must be a mapping"),
])
def test_bad_environment_variables_name_the_key(env, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        load_settings(environ=env)


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "top level must be a mapping"),
    ("grpc: 5\n", "config key grpc must be a mapping"),
    ("metrics:\n  labels: team\n", None),  # a string where a list is expected: split on commas
    ("metrics:\n  labels: {team: 1}\n", "bad value for metrics.labels"),
    ("spool:\n  nope: 1\n", "unknown config key spool.nope"),
])
def test_bad_config_files_name_the_key(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    if message is None:
        assert load_settings(cfg, environ={}).metrics.labels == ["team"]
        return
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, environ={})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"grpc": {"transport": "grpc"}}, "grpc.transport must be grpcio or h2"),
    ({"grpc": {"busy_poll_us": -1}}, "grpc.busy_poll_us must be between 0 and 100000"),
    ({"grpc": {"workers": 0}}, "grpc.workers must be at least 1"),
    ({"grpc": {"workers": 2, "transport": "grpcio", "listen": "unix:/tmp/x.sock"}}, "needs a host:port listen"),
    ({"spool": {"fsync": "sometimes"}}, "spool.fsync must be always, batch or never"),
    ({"batch": {"max_batch_size": 0}}, "batch sizes must be positive"),
    ({"storage": {"dsn": "clickhouse://db:9000"}}, "storage.dsn must start with chdb:, http:// or https://"),
    ({"attribution": {"headers": {"X-Team": "team"}}}, "attribution header 'X-Team' must be lower case"),
])
def test_inconsistent_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, overrides, environ={})


def test_defaults_are_valid_and_serve_h2():
    s = load_settings(environ={})
    assert (s.grpc.transport, s.grpc.workers, s.grpc.event_loop, s.grpc.busy_poll_us) == ("h2", 1, "asyncio", 0)

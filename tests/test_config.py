"""Settings: a YAML file, then EXTPROC_* variables (as Kubernetes sets them: strings), then flags;
every bad value is refused at start with a message naming the key."""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass

import pytest

from extproc.config import RULES, ConfigError, Settings, at_least, load_settings, rules, validate


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


# ---- range and type checks: each refusal names the key and the value ------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    # a zero or negative interval / timeout / size
    ({"batch": {"flush_interval_ms": 0}}, "batch.flush_interval_ms must be at least 1, not 0"),
    ({"spool": {"write_interval_ms": -5}}, "spool.write_interval_ms must be at least 1, not -5"),
    ({"storage": {"connect_timeout_ms": 0}}, "storage.connect_timeout_ms must be at least 1, not 0"),
    ({"storage": {"ttl_days": -1}}, "storage.ttl_days must be at least 0, not -1"),
    ({"metrics": {"max_series": 0}}, "metrics.max_series must be at least 1, not 0"),
    ({"spool": {"segment_bytes": 100}}, "spool.segment_bytes must be between 4096 and 1099511627776, not 100"),
    ({"admin": {"port": 70_000}}, "admin.port must be between 0 and 65535, not 70000"),
    ({"grpc": {"workers": 1000}}, "grpc.workers must be between 1 and 256, not 1000"),
    # an unknown enum value
    ({"log_level": "LOUD"}, "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not 'LOUD'"),
    ({"storage": {"insert_format": "csv"}}, "storage.insert_format must be protobuf or arrow, not 'csv'"),
    # an empty string where something is needed
    ({"spool": {"dir": ""}}, "spool.dir must not be empty"),
    ({"provider_name": ""}, "provider_name must not be empty"),
])
def test_out_of_range_values_are_refused_naming_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_settings(None, overrides, environ={})


@pytest.mark.parametrize(("text", "message"), [
    ("batch:\n  flush_interval_ms: 2.5\n", "bad value for batch.flush_interval_ms: 2.5"),  # float for int
    ("batch:\n  max_batch_size: true\n", "bad value for batch.max_batch_size: True"),  # bool for int
    ("storage:\n  verify: 5\n", "bad value for storage.verify: 5"),  # number for a bool
    ("storage:\n  dsn: [a, b]\n", "bad value for storage.dsn: ['a', 'b']"),  # list for a string
    ("metrics:\n  labels: [team, 3]\n", "metrics.labels must be a list of strings, not ['team', 3]"),
    ("tokenizer:\n  models: {llama: 3}\n", "tokenizer.models must map strings to strings, not {'llama': 3}"),
])
def test_values_of_the_wrong_type_are_refused_naming_key_and_value(tmp_path, text, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_settings(cfg, environ={})


def test_settings_built_in_code_are_type_checked_too():
    s = Settings()
    s.spool.segment_bytes = 1.5e6  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"^spool\.segment_bytes must be a whole number, not 1500000\.0$"):
        validate(s)
    s = Settings()
    s.batch.max_queue_size = "100"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=r"^batch\.max_queue_size must be a whole number, not '100'$"):
        validate(s)


def test_a_float_key_takes_whole_numbers_and_strings():
    """Sections other engineers add may hold prices: `x: float = 0` takes 2, 0.5 and "0.5"."""
    from dataclasses import dataclass

    from extproc.config import _apply

    @dataclass
    class Prices:
        per_token: float = 0

    for given in (2, 0.5, "0.5"):
        p = Prices()
        _apply(p, {"per_token": given}, "pricing.")
        assert p.per_token == float(given) and isinstance(p.per_token, float)
    with pytest.raises(ConfigError, match=r"^bad value for pricing\.per_token: True$"):
        _apply(Prices(), {"per_token": True}, "pricing.")


def test_the_defaults_and_the_lower_case_log_level_pass():
    validate(Settings())
    assert load_settings(None, {"log_level": "debug"}, environ={}).log_level == "debug"


def test_every_numeric_key_has_a_range():
    """A new int key without a rule fails here: add it to the rules(...) call beside its
    dataclass (at_least(0) if anything goes)."""
    def walk(obj, where=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from walk(value, f"{where}{f.name}.")
            elif str(f.type) in ("int", "float"):
                yield f"{where}{f.name}", RULES.get(type(obj), {}).get(f.name)
    missing = [name for name, rule in walk(Settings()) if rule is None or (rule.min is None and rule.max is None)]
    assert missing == []


def test_a_rule_for_a_key_that_does_not_exist_is_refused_at_import():
    with pytest.raises(TypeError, match="no such key"):
        rules(Settings, nope=at_least(1))

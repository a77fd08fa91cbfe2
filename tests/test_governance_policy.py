"""The policy file: its format, the errors that name their line, reloads that keep the last good
policy, and `extproc keys create|list|revoke` on a real file."""

from __future__ import annotations

import logging

import pytest

from extproc.cli import main
from extproc.config import ConfigError, load_settings
from extproc.governance.periods import period_bounds
from extproc.governance.policy import PolicyError, hash_key, load_policy, parse_policy
from extproc.governance.reload import PolicyWatcher
from extproc.governance.runtime import Governance

H1, H2 = hash_key("sk-one"), hash_key("sk-two")

GOOD = f"""
keys:
  - sha256: "{H1}"
    team: search
    feature: ranking
  - sha256: "{H2}"
    team: ads
    name: ads-batch
budgets:
  - team: search
    period: month
    limit_usd: 500
    hard: true
  - team: search
    feature: ranking
    period: day
    limit_tokens: 1000
rate_limits:
  - key: ads-batch
    requests_per_minute: 60
    tokens_per_minute: 10000
require_key: true
"""


def test_the_documented_format_parses():
    p = parse_policy(GOOD)
    assert p.require_key and p.has_hard_budgets
    assert p.keys[H1].labels == {"team": "search", "feature": "ranking"}
    assert p.keys[H2].id == "ads-batch"
    usd, tokens = p.budgets
    assert (usd.limit_micros, usd.period, usd.hard) == (500_000_000, "month", True)
    assert (tokens.scope.name, tokens.limit_tokens, tokens.hard) == ("team=search,feature=ranking", 1000, False)
    assert p.rate_limits[0].scope.key == "ads-batch" and p.rate_limits[0].tokens_per_minute == 10000


@pytest.mark.parametrize(("text", "line", "says"), [
    (f'keys:\n  - sha256: "{H1}"\n    team: a\n  - sha256: "{H1}"\n    team: b\n', 4,
     "duplicate key hash (first on line 2)"),
    ('keys:\n  - sha256: "sk-plaintext"\n    team: a\n', 2, "64 hex characters"),
    (f'keys:\n  - sha256: "{H1}"\n', 2, "team is required"),
    ("budgets:\n  - team: a\n    period: year\n    limit_tokens: 5\n", 3, "period must be one of day, week, month"),
    ("budgets:\n  - team: a\n    limit_tokens: -5\n", 3, "non-negative integer"),
    ("budgets:\n  - period: day\n    limit_tokens: 5\n", 2, "must name a scope"),
    ("budgets:\n  - team: a\n    hard: true\n", 2, "needs limit_usd and/or limit_tokens"),
    ("budgets:\n  - team: a\n    limit_tokens: 5\n    hard: yes please\n", 4, "true or false"),
    ("rate_limits:\n  - team: a\n", 2, "requests_per_minute and/or tokens_per_minute"),
    ("keys: [\n", 2, "not valid YAML"),
    ("require_key: true\nbudget: []\n", 2, "unknown field 'budget'"),
    ("keys:\n  - team: a\n    team: b\n", 3, "'team' given twice"),
    ("rate_limits:\n  - key: ghost\n    requests_per_minute: 1\n", 2, "'ghost' names no key in this file"),
])
def test_bad_files_are_refused_naming_the_line(text, line, says):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.yaml")
    assert f"policy.yaml:{line}:" in str(info.value) and says in str(info.value)


def test_a_bad_file_stops_the_sidecar_at_start(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text(f'keys:\n  - sha256: "{H1}"\n    team: a\n  - sha256: "{H1}"\n    team: b\n')
    settings = load_settings(None, {"policy": {"file": str(f)}}, environ={})
    with pytest.raises(ConfigError, match=r"policy.yaml:4: duplicate key hash"):
        Governance(settings)


def test_reload_installs_a_good_file_and_keeps_the_last_good_one_on_a_broken_file(tmp_path, caplog):
    f = tmp_path / "policy.yaml"
    f.write_text(GOOD)
    installed = []
    w = PolicyWatcher(f, installed.append)
    first = w.load_initial()
    assert w.check() is False  # unchanged
    f.write_text(GOOD.replace("limit_tokens: 1000", "limit_tokens: 2000"))
    assert w.check() is True and installed[-1].budgets[1].limit_tokens == 2000
    with caplog.at_level(logging.ERROR):
        f.write_text(GOOD.replace("rate_limits:", "  - team: x\n    period: fortnight\n    limit_tokens: 1\nrate_limits:"))
        assert w.check() is False
    assert len(installed) == 1 and w.errors == 1
    assert "keeping the last good policy" in caplog.text and "period must be one of" in w.last_error
    f.write_text(GOOD)  # fixed: installed again, error cleared
    assert w.check() is True and w.last_error == "" and installed[-1].budgets == first.budgets


def test_observe_mode_with_hard_budgets_is_refused_at_start_saying_why(tmp_path, capsys):
    f = tmp_path / "policy.yaml"
    f.write_text(GOOD)
    assert main(["dev", "--mode", "observe", "--policy", str(f), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "cannot be enforced in observe mode" in err and "hard budgets" in err and "--mode sync" in err


def test_keys_create_list_revoke_on_a_file(tmp_path, capsys):
    f = tmp_path / "policy.yaml"
    assert main(["keys", "create", "--team", "search", "--feature", "qa", "--name", "bot", "--policy", str(f)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("sk-extproc-") and token not in f.read_text()
    p = load_policy(f)
    assert p.keys[hash_key(token)].labels == {"team": "search", "feature": "qa"}
    assert main(["keys", "create", "--team", "ads", "--policy", str(f)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--policy", str(f)]) == 0
    listing = capsys.readouterr().out
    assert "bot" in listing and "search" in listing and "ads" in listing and hash_key(token) not in listing
    assert main(["keys", "revoke", "--policy", str(f), "bot"]) == 0
    assert list(load_policy(f).keys.values())[0].labels == {"team": "ads"}
    assert main(["keys", "revoke", "--policy", str(f), "nosuchkey"]) == 2
    assert "no key matches" in capsys.readouterr().err


def test_periods_are_calendar_aligned_in_utc():
    t = 1_764_806_400 + 3600 * 13  # 2025-12-04 13:00 UTC, a Thursday
    assert period_bounds("day", t) == (1_764_806_400, 1_764_892_800)
    assert period_bounds("week", t) == (1_764_547_200, 1_765_152_000)  # Monday 2025-12-01
    assert period_bounds("month", t) == (1_764_547_200, 1_767_225_600)  # Dec 1 -> Jan 1


def test_serve_with_a_duplicate_key_hash_exits_2_naming_the_line(tmp_path, capsys):
    f = tmp_path / "policy.yaml"
    f.write_text(f'keys:\n  - sha256: "{H1}"\n    team: a\n  - sha256: "{H1}"\n    team: b\n')
    code = main(["serve", "--policy", str(f), "--listen", "127.0.0.1:0", "--admin-port", "0",
                 "--data-dir", str(tmp_path / "data"), "--log-level", "ERROR"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{f}:4: duplicate key hash (first on line 2)" in err
    assert not (tmp_path / "data").exists()  # refused before storage was opened

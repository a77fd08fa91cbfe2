"""The pricing file: list cost of a request in integer micro-USD, prices that change on a date,
globs, GPU pool cost per hour and work units, and every refusal naming its line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from extproc.config import ConfigError
from extproc.events import UsageEvent
from extproc.governance.pricing import PricingError, load_pricing, parse_pricing
from extproc.governance.stamp import PricingStage, stamp

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "deploy" / "pricing.example.yaml"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
NS = 1_000_000_000
DEC_2026 = 1_796_083_200 * NS  # 2026-12-01T00:00:00Z
JAN_2027 = 1_798_761_600 * NS  # 2027-01-01T00:00:00Z


def _cost(book, model: str = LLAMA, at: int = DEC_2026, **tokens: int) -> int | None:
    kw = dict(prompt_tokens=0, cached_tokens=0, completion_tokens=0, reasoning_tokens=0) | tokens
    return book.list_cost_micros(model, at_unix_nano=at, **kw)


def test_the_shipped_example_loads_and_prices_exactly() -> None:
    book = load_pricing(EXAMPLE)
    # 3M uncached prompt x 0.20 + 0.6M completion x 0.80 = 1.08 USD
    assert _cost(book, prompt_tokens=3_000_000, completion_tokens=600_000) == 1_080_000
    # cached prompt tokens at the cached price: 0.5M x 0.20 + 0.5M x 0.02 + 0.2M x 0.80 = 0.27 USD
    assert _cost(book, prompt_tokens=1_000_000, cached_tokens=500_000, completion_tokens=200_000) == 270_000
    # from 2027-01-01 the input price is 0.18; the rest carries on
    assert _cost(book, at=JAN_2027, prompt_tokens=1_000_000, completion_tokens=1_000_000) == 980_000
    assert _cost(book, at=JAN_2027 - 1, prompt_tokens=1_000_000) == 200_000
    assert book.price(LLAMA, JAN_2027).ref == f"{LLAMA}@2027-01-01"
    assert book.price(LLAMA, DEC_2026).ref == f"{LLAMA}@start"
    # a glob; a model nothing matches is unpriced (None), never 0
    assert _cost(book, "Qwen/Qwen2.5-7B", prompt_tokens=1_000_000) == 300_000
    assert _cost(book, "mistral-7b", prompt_tokens=1_000_000) is None


def test_rounding_is_once_per_request_half_up() -> None:
    book = parse_pricing('models:\n  m:\n    input_per_mtok: 0.20\n    output_per_mtok: 0.80\n')
    assert _cost(book, "m", prompt_tokens=7) == 1            # 1.4 micro-USD
    assert _cost(book, "m", prompt_tokens=12) == 2           # 2.4
    assert _cost(book, "m", prompt_tokens=13) == 3           # 2.6
    assert _cost(book, "m", prompt_tokens=5, completion_tokens=0) == 1   # 1.0
    assert _cost(book, "m", prompt_tokens=2, completion_tokens=1) == 1   # 0.4 + 0.8 = 1.2
    assert _cost(book, "m", completion_tokens=5, prompt_tokens=5) == 5   # 1.0 + 4.0


def test_reasoning_price_fees_globs_and_default() -> None:
    book = parse_pricing(
        'models:\n'
        '  "o-*":\n    input_per_mtok: 1\n    output_per_mtok: 4\n    reasoning_per_mtok: 10\n'
        '    request_fee: 0.0005\n'
        '  "o-mini":\n    input_per_mtok: 0.5\n    output_per_mtok: 2\n'
        '  "*":\n    input_per_mtok: 0.1\n    output_per_mtok: 0.1\n')
    # 100 completion tokens of which 40 reasoning: 60 x 4 + 40 x 10 = 640 micro + 500 fee
    assert _cost(book, "o-large", completion_tokens=100, reasoning_tokens=40) == 1140
    assert book.list_cost_micros("o-large", prompt_tokens=0, cached_tokens=0, completion_tokens=100,
                                 reasoning_tokens=40, at_unix_nano=DEC_2026, request_fee=False) == 640
    assert _cost(book, "o-mini", prompt_tokens=1_000_000) == 500_000  # exact name beats the glob
    assert _cost(book, "anything", prompt_tokens=1_000_000) == 100_000  # "*" last
    # cached_input_per_mtok defaults to the input price
    assert _cost(book, "o-mini", prompt_tokens=1_000_000, cached_tokens=1_000_000) == 500_000


def test_pool_cost_per_hour_and_work_units_of_the_example() -> None:
    """README's worked example: 8 x (25000 / 25000 h + 0.7 kW x 1.25 x 0.12) + 1460 / 730 = 10.84 USD/h."""
    pool = load_pricing(EXAMPLE).pools["h100-a"]
    rate = pool.rate_at(DEC_2026)
    assert (rate.capital_per_hour, rate.power_per_hour, rate.ops_per_hour) == (
        Decimal("8"), Decimal("0.84"), Decimal("2"))
    assert rate.hour_cost_micros == 10_840_000
    assert rate.capacity_work_milli == 20_000_000 * 1000
    # 1M prompt, 0.5M of them cached, 0.2M completion: 0.5M x 1 + 0.2M x 5 = 1.5M work units
    assert pool.work_milli(DEC_2026, prompt_tokens=1_000_000, cached_tokens=500_000,
                           completion_tokens=200_000) == 1_500_000 * 1000


def test_rent_and_dated_pool_changes() -> None:
    book = parse_pricing(
        'models:\n  m:\n    pool: p\n'
        'gpu_pools:\n  p:\n    gpus: 2\n    rent_per_gpu_hour: 2.50\n    capacity_work_per_hour: 1000\n'
        '    from: 2026-12-01\n'
        '    changes:\n      - from: 2027-01-01\n        rent_per_gpu_hour: 2.00\n        decode_weight: 3\n')
    pool = book.pool_for("m")
    assert pool is not None and pool.explicit_start
    assert pool.rate_at(DEC_2026 - 1) is None  # not in service yet
    assert pool.rate_at(DEC_2026).hour_cost_micros == 5_000_000
    assert pool.rate_at(JAN_2027).hour_cost_micros == 4_000_000
    assert pool.work_milli(JAN_2027, prompt_tokens=0, cached_tokens=0, completion_tokens=10) == 30_000
    assert book.price("m", DEC_2026) is None  # a pool but no list price: unpriced


def _event(**fields) -> UsageEvent:
    base = dict(metered=True, request_model=LLAMA, response_model=LLAMA, http_status=200,
                start_time_unix_nano=DEC_2026, prompt_tokens=1000, cached_tokens=200, completion_tokens=50)
    return UsageEvent(**(base | fields))


def test_stamp_writes_cost_status_pool_and_work() -> None:
    book = load_pricing(EXAMPLE)
    ev = _event()
    stamp(book, ev)
    # 800 x 0.20 + 200 x 0.02 + 50 x 0.80 = 160 + 4 + 40 micro-USD
    assert (ev.list_cost_micros, ev.price_status, ev.price_ref) == (204, "priced", f"{LLAMA}@start")
    assert (ev.gpu_pool, ev.gpu_work_milli) == ("h100-a", (800 + 5 * 50) * 1000)
    unknown = _event(request_model="mistral", response_model="mistral")
    stamp(book, unknown)
    assert (unknown.list_cost_micros, unknown.price_status, unknown.gpu_pool) == (0, "unpriced", "")
    models = UsageEvent(metered=False, path="/v1/models")
    stamp(book, models)
    assert models.price_status == "unmetered"
    nobook = _event()
    stamp(None, nobook)
    assert nobook.price_status == "unpriced"


def test_a_pricing_bug_leaves_the_event_unpriced_and_flagged(monkeypatch) -> None:
    stage = PricingStage(load_pricing(EXAMPLE))
    monkeypatch.setattr(stage.book, "entry", lambda model: 1 / 0)
    ev = _event()
    stage.emit(ev)
    assert (ev.price_status, ev.list_cost_micros, ev.error) == ("unpriced", 0, "internal_error")
    assert "pricing: ZeroDivisionError" in ev.error_detail and stage.errors == 1


@pytest.mark.parametrize(("text", "line", "message"), [
    ("models:\n  m:\n    input_per_mtok: 0.2\n   output_per_mtok: 1\n", 4, "not valid YAML"),
    ("models:\n  m:\n    input_per_mtok: 0.2\n    output_per_mtok: [1\n", 5, "opened on line 4"),
    ("models:\n  m:\n    input_per_mtok: -0.2\n    output_per_mtok: 1\n", 3, "must not be negative"),
    ("models:\n  m:\n    input_per_mtok: 0.2\n    output_per_mtok: 1\n    pool: nope\n", 5,
     "unknown GPU pool 'nope'"),
    ("models:\n  m:\n    input_per_mtok: 0.2\n    output_per_mtok: cheap\n", 4, "must be a number"),
    ("models:\n  m:\n    input_per_mtok: 0.2\n    outptu_per_mtok: 1\n", 4, "unknown key 'outptu_per_mtok'"),
    ("models:\n  m:\n    input_per_mtok: 0.0000001\n    output_per_mtok: 1\n", 3, "more than 6 decimal places"),
    ("models:\n  m:\n    input_per_mtok: 0.2\n", 3, "needs input_per_mtok and output_per_mtok"),
    ("models:\n  m:\n    input_per_mtok: .nan\n    output_per_mtok: 1\n", 3, "must be a number, got '.nan'"),
    ("models:\n  m:\n    input_per_mtok: 1\n    output_per_mtok: 1\n    changes:\n      - from: 2027-13-01\n"
     "        input_per_mtok: 2\n", 6, "ISO 8601"),
    ("currency: EUR\nmodels: {}\n", 1, "only USD"),
    ("gpu_pools:\n  p:\n    gpus: 2\n    capacity_work_per_hour: 10\nmodels: {}\n", 3, "rent_per_gpu_hour or purchase"),
    ("gpu_pools:\n  p:\n    gpus: 2\n    rent_per_gpu_hour: 1\n    capacity_work_per_hour: 0\nmodels: {}\n", 5,
     "greater than 0"),
    ("gpu_pools:\n  p:\n    gpus: 2\n    rent_per_gpu_hour: 1\n    pue: 0.9\n    capacity_work_per_hour: 5\n"
     "models: {}\n", 3, "pue is at least 1"),
    ("- just\n- a list\n", 1, "must be a mapping"),
])
def test_bad_files_are_refused_naming_the_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text(text)
    with pytest.raises(PricingError) as err:
        load_pricing(path)
    assert isinstance(err.value, ConfigError)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert message in str(err.value)


def test_a_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="cannot read the pricing file"):
        load_pricing(tmp_path / "nope.yaml")


def test_serve_refuses_a_bad_pricing_file_at_start_naming_the_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from extproc.devtools.devstack import free_port

    bad = tmp_path / "pricing.yaml"
    bad.write_text("models:\n  m:\n    input_per_mtok: 1\n    output_per_mtok: 1\n    pool: missing\n")
    done = subprocess.run(
        [sys.executable, "-m", "extproc", "serve", "--pricing", str(bad), "--data-dir", str(tmp_path / "data"),
         "--listen", f"127.0.0.1:{free_port()}", "--admin-port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"config error: {bad}:5: models.'m': unknown GPU pool 'missing'" in done.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened

"""Governance: what a request costs and who may spend what.

- pricing: the price book loaded from the pricing file, list-price cost of one request in
  integer micro-dollars, GPU pools and the work units each request uses; stamp: writes those
  figures onto each UsageEvent before the sinks see it.
- keys and budgets: the policy file (virtual keys, budgets, rate limits: policy.py), admission
  and settlement (governor.py, ledger.py, periods.py) as pure rules; the I/O lives in its own
  modules (redis_ledger.py, reload.py, alerts.py, keyfile.py) and runtime.py wires them.
"""

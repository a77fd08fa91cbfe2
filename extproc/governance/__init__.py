"""Virtual keys, budgets and rate limits: pure rules here, Redis I/O in redis_ledger.py."""

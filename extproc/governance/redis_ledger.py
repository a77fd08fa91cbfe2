"""The ledger shared by replicas: Redis, with each reservation and settlement one Lua script
(atomic on the Redis server, so concurrent sidecars cannot both take the last of a budget).

Redis unreachable: `on_failure` says what admission does. "open": this process carries on with its
own local ledger (counted; budgets then hold per replica until Redis is back); "closed": the
request is refused with 503. Either way, never an exception up the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from extproc.governance.ledger import Bucket, Counter, LocalLedger, Outcome

log = logging.getLogger(__name__)

# settlements arriving within this window share one Redis call
SETTLE_WINDOW_S = 0.002

# Both scripts: KEYS = counters then buckets. ARGV[1] = number of counters; per counter: limit,
# amount, hard, expires_at; per bucket: capacity, amount. A bucket refills at its capacity per
# minute since it was last written (Redis's clock, so replicas agree).
_PRELUDE = """
local n = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, cap)
  local st = redis.call('HMGET', key, 'tokens', 'at')
  local tokens = tonumber(st[1]) or cap
  local at = tonumber(st[2]) or now
  return math.min(cap, tokens + math.max(0, now - at) * cap / 60)
end
local function put(key, tokens)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', key, 120)
end
"""

# Returns {ok, refused (1-based, 0 = none), retry_after, totals..., remaining...} with floats as
# strings.
_RESERVE = _PRELUDE + """
local found = {}
local a = 2
for k = 1, n do
  local limit, amount, hard = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2]
  local cur = tonumber(redis.call('GET', KEYS[k]) or '0')
  found[k] = cur
  if hard == '1' and cur + amount > limit then
    local retry = tonumber(ARGV[a + 3]) - 86400 - now
    return {0, k, tostring(retry), unpack(found)}
  end
  a = a + 4
end
local levels = {}
for j = 1, #KEYS - n do
  local cap, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local lvl = level(KEYS[n + j], cap)
  if lvl < amount then
    local wait = 60
    if cap > 0 then wait = (amount - lvl) * 60 / cap end
    return {0, n + j, tostring(wait)}
  end
  levels[j] = lvl
  a = a + 2
end
local out = {1, 0, '0'}
a = 2
for k = 1, n do
  local v = redis.call('INCRBY', KEYS[k], ARGV[a + 1])
  redis.call('EXPIREAT', KEYS[k], ARGV[a + 3])
  out[#out + 1] = v
  a = a + 4
end
for j = 1, #KEYS - n do
  local left = levels[j] - tonumber(ARGV[a + 1])
  put(KEYS[n + j], left)
  out[#out + 1] = tostring(left)
  a = a + 2
end
return out
"""

# Amounts are added unconditionally (negative: released). Returns counter values.
_ADJUST = _PRELUDE + """
local out = {}
local a = 2
for k = 1, n do
  out[#out + 1] = redis.call('INCRBY', KEYS[k], ARGV[a + 1])
  redis.call('EXPIREAT', KEYS[k], ARGV[a + 3])
  a = a + 4
end
for j = 1, #KEYS - n do
  local cap, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  put(KEYS[n + j], math.min(cap, level(KEYS[n + j], cap) - amount))
  a = a + 2
end
return out
"""

# KEYS[1] seeded to ARGV[1] unless it already holds more; ARGV[2] expires_at.
_SEED = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('EXPIREAT', KEYS[1], ARGV[2])
end
return 1
"""


def _argv(counters: list[Counter], buckets: list[Bucket]) -> list[Any]:
    argv: list[Any] = [len(counters)]
    for c in counters:
        argv += [c.limit, c.amount, 1 if c.hard else 0, c.expires_at]
    for b in buckets:
        argv += [b.capacity, b.amount]
    return argv


class RedisLedger:
    is_async: Literal[True] = True

    def __init__(self, url: str, *, prefix: str = "extproc:", on_failure: str = "open",
                 timeout_s: float = 0.25, local: LocalLedger | None = None) -> None:
        if on_failure not in ("open", "closed"):
            raise ValueError("on_failure must be open or closed")
        self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               retry_on_timeout=False)
        self._prefix = prefix
        self.on_failure = on_failure
        self.local = local or LocalLedger()
        self._reserve = self._client.register_script(_RESERVE)
        self._adjust = self._client.register_script(_ADJUST)
        self._seed = self._client.register_script(_SEED)
        self.errors = 0
        self.fallbacks = 0
        self._settling: list[tuple[list[Counter], list[Bucket], asyncio.Future[dict[str, int]]]] = []
        self._settle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.available = True
        self._last_log = 0.0

    def _keys(self, counters: list[Counter], buckets: list[Bucket]) -> list[str]:
        return [self._prefix + c.key for c in counters] + [self._prefix + b.key for b in buckets]

    def _failed(self, what: str, exc: Exception) -> None:
        self.errors += 1
        self.available = False
        now = time.monotonic()
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("redis %s failed (%s); policy on failure: %s (%s)", what, exc, self.on_failure,
                        "local state in this process" if self.on_failure == "open" else "requests refused")

    async def reserve(self, counters: list[Counter], buckets: list[Bucket]) -> Outcome:
        try:
            raw = await self._reserve(keys=self._keys(counters, buckets), args=_argv(counters, buckets))
        except (RedisError, OSError) as exc:
            self._failed("reserve", exc)
            if self.on_failure == "closed":
                return Outcome(False, refused=-2, retry_after_s=1.0)
            self.fallbacks += 1
            return self.local.reserve(counters, buckets)
        self.available = True
        ok, refused, retry = int(raw[0]), int(raw[1]), float(raw[2])
        rest = raw[3:]
        n = len(counters)
        if not ok:
            return Outcome(False, refused - 1, max(retry, 0.001), [int(v) for v in rest[:n]])
        return Outcome(True, totals=[int(v) for v in rest[:n]], remaining=[float(v) for v in rest[n:]])

    async def adjust(self, counters: list[Counter], buckets: list[Bucket]) -> list[int]:
        """Settlements are off the request path: those arriving within SETTLE_WINDOW_S go to
        Redis as one script call (amounts summed per key), so a busy sidecar pays about one
        round trip per request (the reservation), not two."""
        fut: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self._settling.append((counters, buckets, fut))
        if self._settle_timer is None:
            self._settle_timer = asyncio.get_running_loop().call_later(SETTLE_WINDOW_S, self._settle_batch)
        totals = await fut
        return [totals[c.key] for c in counters]

    def _settle_batch(self) -> None:
        self._settle_timer = None
        batch, self._settling = self._settling, []
        task = asyncio.ensure_future(self._send_settlements(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_settlements(self, batch: list[tuple[list[Counter], list[Bucket], asyncio.Future[dict[str, int]]]]) -> None:
        counters: dict[str, Counter] = {}
        buckets: dict[str, Bucket] = {}
        for cs, bs, _ in batch:
            for c in cs:
                have = counters.get(c.key)
                counters[c.key] = c if have is None else Counter(c.key, c.limit, have.amount + c.amount, c.hard,
                                                                 max(have.expires_at, c.expires_at))
            for b in bs:
                have_b = buckets.get(b.key)
                buckets[b.key] = b if have_b is None else Bucket(b.key, b.capacity, have_b.amount + b.amount)
        merged, merged_b = list(counters.values()), list(buckets.values())
        try:
            raw = await self._adjust(keys=self._keys(merged, merged_b), args=_argv(merged, merged_b))
            totals = dict(zip(counters, (int(v) for v in raw), strict=True))
            self.available = True
        except (RedisError, OSError) as exc:
            self._failed("settle", exc)
            self.fallbacks += len(batch)
            totals = dict(zip(counters, self.local.adjust(merged, merged_b), strict=True))
        for _, _, fut in batch:
            if not fut.done():
                fut.set_result(totals)

    async def claim_alert(self, key: str, expires_at: int) -> bool:
        try:
            return bool(await self._client.set(self._prefix + key, b"1", nx=True, exat=expires_at))
        except (RedisError, OSError) as exc:
            self._failed("alert", exc)
            return self.local.claim_alert(key, expires_at)

    async def values(self, keys: list[str]) -> list[int]:
        if not keys:
            return []
        try:
            raw = await self._client.mget([self._prefix + k for k in keys])
        except (RedisError, OSError) as exc:
            self._failed("read", exc)
            return [self.local.value(k) for k in keys]
        return [int(v) if v is not None else 0 for v in raw]

    async def seed(self, key: str, value: int, expires_at: int) -> None:
        try:
            await self._seed(keys=[self._prefix + key], args=[value, expires_at])
        except (RedisError, OSError) as exc:
            self._failed("seed", exc)
        self.local.seed(key, value, expires_at)

    async def close(self) -> None:
        if self._settle_timer is not None:  # what waits for the window goes now
            self._settle_timer.cancel()
            self._settle_batch()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._client.aclose()

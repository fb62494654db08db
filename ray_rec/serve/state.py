"""Per-user event state for recommending by user id: each user's recent clicks and browses.

One small interface, `UserStore`, two backends: `MemoryStore` (in the replica's process: the
embedded default for one replica) and `RedisStore` (one Redis shared by every replica on every
node). A user's clicks and browses are two time-ordered sets, ``<prefix>{<user>}:click`` and
``...:browse`` (Redis sorted sets scored by event time), each capped at ``max_events``, the
newest by event time kept: events that arrive late or out of order land in their place, and an
event sent twice (same user, item, time and kind: a client's retry) is stored once. A write of a
batch of events is one MULTI/EXEC transaction (a connection lost before it ends applies none of
it): acknowledged means applied, and as durable as the server's persistence (``appendonly yes``
with ``appendfsync always`` loses nothing acknowledged).
Reads for a whole Serve batch are one pipelined round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from ray_rec.config import StateConfig
from ray_rec.data.examples import MAX_ABS_SECONDS
from ray_rec.vocab import RawId

logger = logging.getLogger(__name__)

CLICK, BROWSE = "click", "browse"
KINDS = (CLICK, BROWSE)


class StateUnavailable(RuntimeError):
    """The user-state store did not answer (down, unreachable, loading, refusing our password)."""


@dataclass(frozen=True)
class Event:
    """One user event as stored: ``timestamp`` in epoch seconds (milliseconds are converted)."""

    user_id: str
    item_id: RawId
    timestamp: float
    kind: str = CLICK


@dataclass
class UserHistory:
    """A user's stored events, each kind oldest first, as (item id, epoch seconds)."""

    clicks: list[tuple[RawId, float]] = field(default_factory=list)
    browses: list[tuple[RawId, float]] = field(default_factory=list)


def seconds(stamp: float) -> float:
    """Epoch seconds from seconds or milliseconds, read as `prepare` and the request API read them."""
    return stamp / 1000.0 if abs(stamp) > MAX_ABS_SECONDS else float(stamp)


def encode(item: RawId, stamp: float, tie: int = 0) -> str:
    """One stored entry: ``<seconds>|<tie>|i<int id>`` or ``...|s<text id>`` (the id's type survives).
    Entries of one time sort by ``tie``, then by id: `ray-rec state load` numbers a user's events
    of one time in their data set order; live events all have tie 0."""
    return f"{stamp!r}|{tie:05d}|{'i' if isinstance(item, int) else 's'}{item}"


def decode(entry: str) -> tuple[RawId, float]:
    stamp, _, value = entry.split("|", 2)
    return (int(value[1:]) if value[0] == "i" else value[1:]), float(stamp)


def time_ordered(entries: dict[str, float]) -> list[str]:
    """Encoded entries oldest first, ties in the entries' own order, as Redis orders a sorted set."""
    return [e for e, _ in sorted(entries.items(), key=lambda pair: (pair[1], pair[0]))]


class UserStore(Protocol):
    """What a Serve replica needs from a user-state backend. Every method raises
    `StateUnavailable` when the backend cannot answer."""

    async def append(self, events: Sequence[Event]) -> None:
        """Store every event or none (returns once they are stored)."""

    async def clicks(self, user_ids: Sequence[str]) -> list[list[tuple[RawId, float]]]:
        """The stored clicks of each user (oldest first; empty for an unknown user), in one round trip."""

    async def history(self, user_id: str) -> UserHistory:
        """One user's stored clicks and browses."""

    async def forget(self, user_id: str) -> bool:
        """Erase everything stored for the user; whether there was anything."""

    async def close(self) -> None:
        """Release connections."""


def group(events: Sequence[Event]) -> dict[tuple[str, str], dict[str, float]]:
    """Encoded entries and their times by (user, kind)."""
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for e in events:
        out[(e.user_id, e.kind)][encode(e.item_id, e.timestamp)] = e.timestamp
    return out


class MemoryStore:
    """The in-process backend: this replica's own dict, lost when the replica stops. Events sent to
    another replica are not seen here, so it suits one replica (``ray-rec serve``, the demo). It
    holds every user it was sent (an expired one is dropped when next asked for)."""

    def __init__(self, max_events: int, ttl_s: int | None = None) -> None:
        self.max_events, self.ttl_s = max_events, ttl_s
        self._users: dict[str, dict[str, dict[str, float]]] = {}
        self._written: dict[str, float] = {}

    def _live(self, user_id: str) -> dict[str, dict[str, float]] | None:
        if self.ttl_s is not None and user_id in self._written and time.monotonic() - self._written[user_id] > self.ttl_s:
            self._users.pop(user_id, None)
            self._written.pop(user_id, None)
        return self._users.get(user_id)

    async def append(self, events: Sequence[Event]) -> None:
        now = time.monotonic()
        for (user, kind), entries in group(events).items():
            lists = self._live(user)
            if lists is None:
                lists = self._users[user] = {k: {} for k in KINDS}
            merged = {**lists[kind], **entries}
            lists[kind] = {e: merged[e] for e in time_ordered(merged)[-self.max_events:]}  # the newest, in time order
            self._written[user] = now

    async def clicks(self, user_ids: Sequence[str]) -> list[list[tuple[RawId, float]]]:
        return [[decode(e) for e in lists[CLICK]] if (lists := self._live(u)) else [] for u in user_ids]

    async def history(self, user_id: str) -> UserHistory:
        lists = self._live(user_id)
        return UserHistory([decode(e) for e in lists[CLICK]], [decode(e) for e in lists[BROWSE]]) if lists else UserHistory()

    async def forget(self, user_id: str) -> bool:
        self._written.pop(user_id, None)
        return self._users.pop(user_id, None) is not None

    async def close(self) -> None:
        return None


def redis_url(config: StateConfig) -> tuple[str, str | None]:
    """The Redis URL and password from the environment variables ``config`` names.

    Raises:
        ValueError: the URL variable is unset or empty.
    """
    url = os.environ.get(config.url_env, "").strip()
    if not url:
        raise ValueError(f"state.backend is redis but the environment variable {config.url_env} (state.url_env) "
                         f"holding the Redis URL is unset or empty")
    return url, (os.environ.get(config.password_env, "").strip() or None) if config.password_env else None


def connect(url: str, password: str | None, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """A synchronous Redis client that answered PING (for commands, not for the replicas).

    Raises:
        ConnectionError: the server did not answer or refused the password."""
    import redis

    client = redis.Redis.from_url(url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                  decode_responses=True)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        client.close()
        where = urlsplit(url)
        raise ConnectionError(f"Redis at {where.hostname}:{where.port or 6379} did not answer: {exc}") from None
    return client


def keys(prefix: str, user_id: str) -> dict[str, str]:
    """A user's two keys; the braces make them one Redis Cluster hash slot."""
    return {kind: f"{prefix}{{{user_id}}}:{kind}" for kind in KINDS}


class RedisStore:
    """The shared backend: one standalone Redis (or a Sentinel-managed primary) that every replica
    reads and writes. A connection failure or a slower answer than ``timeout_s`` raises
    `StateUnavailable` at once; the next call connects again."""

    def __init__(self, url: str, password: str | None, max_events: int, ttl_s: int | None = None,
                 timeout_s: float = 1.0, prefix: str = "ray_rec:user:") -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.max_events, self.ttl_s, self.prefix = max_events, ttl_s, prefix
        # One immediate retry: the first command after a server restart finds its pooled connection
        # closed; a server that is down fails both tries at once.
        self.client = aioredis.Redis.from_url(url, password=password, socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1),
                                              decode_responses=True, health_check_interval=30)
        self.timeout_s = timeout_s

    async def _run(self, pipe: Any, what: str) -> list[Any]:
        import redis.exceptions

        try:
            return await asyncio.wait_for(pipe.execute(), self.timeout_s * 3)
        except (redis.exceptions.RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StateUnavailable(f"user state store (Redis) failed to {what}: {type(exc).__name__}: {exc}") from None

    async def append(self, events: Sequence[Event]) -> None:
        pipe = self.client.pipeline(transaction=True)
        touched = set()
        for (user, kind), entries in group(events).items():
            key = keys(self.prefix, user)[kind]
            pipe.zadd(key, entries)
            pipe.zremrangebyrank(key, 0, -self.max_events - 1)  # all but the newest max_events
            touched.add(user)
        if self.ttl_s is not None:
            for user in touched:
                for key in keys(self.prefix, user).values():
                    pipe.expire(key, self.ttl_s)
        await self._run(pipe, "store events")

    async def clicks(self, user_ids: Sequence[str]) -> list[list[tuple[RawId, float]]]:
        pipe = self.client.pipeline(transaction=False)
        for user in user_ids:
            pipe.zrange(keys(self.prefix, user)[CLICK], 0, -1)
        return [[decode(e) for e in entries] for entries in await self._run(pipe, "read user histories")]

    async def history(self, user_id: str) -> UserHistory:
        pipe = self.client.pipeline(transaction=False)
        for key in keys(self.prefix, user_id).values():
            pipe.zrange(key, 0, -1)
        clicks, browses = await self._run(pipe, "read a user history")
        return UserHistory([decode(e) for e in clicks], [decode(e) for e in browses])

    async def forget(self, user_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(*keys(self.prefix, user_id).values())
        (deleted,) = await self._run(pipe, "erase a user")
        return bool(deleted)

    async def close(self) -> None:
        await self.client.aclose()


def open_store(config: StateConfig) -> UserStore:
    """The backend ``config`` names (a Redis one connects on first use).

    Raises:
        ValueError: redis without its URL variable set.
    """
    if config.backend == "memory":
        return MemoryStore(config.max_events, config.ttl_s)
    url, password = redis_url(config)
    return RedisStore(url, password, config.max_events, config.ttl_s, config.timeout_s, config.key_prefix)


def event_time(stamp: float | None, now: float | None = None) -> float:
    """An event's time in epoch seconds: the sent one, or the time it arrived."""
    if stamp is None:
        return time.time() if now is None else now
    if not math.isfinite(stamp):
        raise ValueError("timestamp is not a finite number")
    return seconds(stamp)

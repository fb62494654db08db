"""`ray-rec state load`: a prepared data set's latest user histories into Redis, so that a new
deployment answers requests by user id from its first request.

Each user's longest sequence is their latest: the test split's rows hold every earlier split's
(a leave-one-out split's test rows hold every user; a time split's users without a click after
the cutoff are read from the valid split first, and the test split's rows replace theirs). Ray
Data reads the shards; actors that hold the catalog's raw ids write each block of users in one
pipelined round trip, replacing whatever was stored for those users.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from ray_rec.config import StateConfig
from ray_rec.data.examples import CLICK
from ray_rec.data.manifest import read_manifest
from ray_rec.data.pipeline import read_sequences
from ray_rec.predict.user_count import reported_user_count
from ray_rec.serve.state import BROWSE, encode, keys, seconds
from ray_rec.serve.state import CLICK as CLICK_KIND
from ray_rec.serve.state import connect as answering
from ray_rec.vocab import Vocabulary

logger = logging.getLogger(__name__)

USERS_PER_BATCH = 1024  # users written per pipelined round trip


def connect(url: str, password: str | None):  # type: ignore[no-untyped-def]
    """A Redis client that answered PING, for a URL given on a command line.

    Raises:
        ValueError: the URL is not a redis://, rediss:// or unix:// URL, or holds a password.
        ConnectionError: the server did not answer or refused the password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"{url!r} is not a Redis URL (redis://host:6379/0, rediss:// for TLS)")
    if parts.password:
        raise ValueError("the Redis URL holds a password, which a command line shows to every user of the machine: "
                         "put it in RAY_REC_REDIS_PASSWORD instead")
    return answering(url, password)


def ties(times: list[float]) -> list[int]:
    """Each event's rank among the earlier events of its time (times oldest first)."""
    out, run = [], 0
    for j, t in enumerate(times):
        run = run + 1 if j and times[j - 1] == t else 0
        out.append(run)
    return out


class WriteUsers:
    """``map_batches`` actor: writes a block of user sequences to Redis, one pipeline per block."""

    def __init__(self, data: str, url: str, password: str | None, state: StateConfig, counter=None) -> None:  # type: ignore[no-untyped-def]
        vocab = Vocabulary.load(data)
        self.raw = np.array([None, *(vocab.raw_id(i) for i in range(1, len(vocab) + 1))], dtype=object)
        self.client = connect(url, password)
        self.state, self.counter = state, counter

    def __call__(self, table: pa.Table) -> pa.Table:
        cap, ttl, prefix = self.state.max_events, self.state.ttl_s, self.state.key_prefix
        pipe = self.client.pipeline(transaction=False)
        users = table.column("user_id").to_pylist()
        for user, items, events, stamps in zip(users, table.column("items").to_numpy(zero_copy_only=False),
                                               table.column("events").to_numpy(zero_copy_only=False),
                                               table.column("timestamps").to_numpy(zero_copy_only=False)):
            key = keys(prefix, user)
            pipe.delete(*key.values())
            is_click = np.asarray(events) == CLICK
            for kind, mask in ((CLICK_KIND, is_click), (BROWSE, ~is_click)):
                times = [seconds(float(t)) for t in np.asarray(stamps)[mask][-cap:]]
                entries = {encode(item, t, tie): t
                           for item, t, tie in zip(self.raw[np.asarray(items)[mask]][-cap:], times, ties(times))}
                if entries:
                    pipe.zadd(key[kind], entries)
                    if ttl is not None:
                        pipe.expire(key[kind], ttl)
        pipe.execute()
        if self.counter is not None:
            self.counter.add.remote(len(users))
        return pa.table({"users": [len(users)]})


def load_state(data: str, url: str, password: str | None, state: StateConfig | None = None,
               progress: Callable[[str], None] | None = None, progress_s: float = 30.0, writers: int = 2) -> dict[str, int]:
    """Write every user's latest sequence of ``data`` (clicks and browses, each capped at
    ``state.max_events``, newest kept) under ``state.key_prefix``; users already stored are
    replaced. Returns the users written per split read. (A time split's users with no click
    before the cutoff are in no split, so not written.)

    Raises:
        InputError: ``data`` is not a prepared data set.
        ValueError, ConnectionError: a bad URL, or a Redis that does not answer."""
    state = state or StateConfig(backend="redis")
    say = progress or logger.info
    manifest = read_manifest(data)
    connect(url, password).close()  # a wrong URL or password fails here, before any Ray work
    splits = ["test"] if manifest.split.protocol == "leave_one_out" else ["valid", "test"]
    written: dict[str, int] = {}
    for split in splits:  # in order: a later split's rows replace an earlier one's
        say(f"writing the {split} split's users to Redis (each user's latest sequence, "
            f"at most {state.max_events} clicks and {state.max_events} browses)")
        with reported_user_count(progress_s, say, "written") as counter:
            rows = read_sequences(data, split, manifest).map_batches(
                WriteUsers, fn_constructor_args=(data, url, password, state, counter), batch_format="pyarrow",
                batch_size=USERS_PER_BATCH, concurrency=writers, num_cpus=0.5)
            written[split] = sum(int(row["users"]) for row in rows.iter_rows())
        say(f"{written[split]:,} users of the {split} split written")
    return written

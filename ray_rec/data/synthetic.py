"""A generator of synthetic click-and-browse logs whose users' interests drift over time.

This is synthetic data, for the demo and the tests. Items belong to topics; each user's interest
walks through topics in a drift that is learnable: mostly staying, sometimes moving on to the next
topic in the user's own cycle. At every step the user is shown a handful of items (browses) and
clicks one of those from the current topic, preferring popular ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

START = 1_700_000_000


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and shape of a synthetic log."""

    users: int = 2000
    items: int = 500
    topics: int = 20
    min_clicks: int = 8
    max_clicks: int = 30
    shown_per_step: int = 5
    stay: float = 0.7  # chance that the interest stays on its topic at the next click
    seed: int = 0


def generate(spec: SyntheticSpec) -> tuple[pa.Table, pa.Table]:
    """Returns (events with user_id, item_id, timestamp (ISO 8601), event; items with item_id, category)."""
    rng = np.random.default_rng(spec.seed)
    topic_of = rng.integers(0, spec.topics, spec.items)
    popularity = rng.pareto(1.2, spec.items) + 1.0
    by_topic = [np.flatnonzero(topic_of == t) for t in range(spec.topics)]
    weights = [popularity[ids] / popularity[ids].sum() if len(ids) else ids for ids in by_topic]
    users, items, stamps, events = [], [], [], []
    for u in range(spec.users):
        cycle = rng.permutation(spec.topics)  # this user's order of interests
        pos = int(rng.integers(0, spec.topics))
        t = START + int(rng.integers(0, 86400 * 30))
        for _ in range(int(rng.integers(spec.min_clicks, spec.max_clicks + 1))):
            topic = int(cycle[pos % spec.topics])
            if not len(by_topic[topic]):
                pos += 1
                continue
            clicked = int(rng.choice(by_topic[topic], p=weights[topic]))
            shown = rng.integers(0, spec.items, spec.shown_per_step - 1)
            for item, event in [*((int(i), "browse") for i in shown if i != clicked), (clicked, "click")]:
                users.append(f"u{u}")
                items.append(f"i{item}")
                stamps.append(t)
                events.append(event)
                t += int(rng.integers(1, 30))
            t += int(rng.exponential(3600)) + 1
            if rng.random() > spec.stay:
                pos += 1
    iso = np.array(stamps, dtype="datetime64[s]").astype(str)
    log = pa.table({"user_id": users, "item_id": items, "timestamp": [s + "Z" for s in iso], "event": events})
    catalog = pa.table({"item_id": [f"i{i}" for i in range(spec.items)], "category": [f"topic{t}" for t in topic_of]})
    return log, catalog


def bulk_log(
    events: int, items: int = 50_000, mean_clicks: int = 40, chunk_events: int = 1_000_000, seed: int = 0
) -> Iterator[pa.Table]:
    """A large events log in chunks of about ``chunk_events`` rows, generated with numpy (for the
    scale benchmarks; `generate` is the one to learn from). Each chunk holds whole users: a
    topic that drifts, Zipf-popular items within the topic, 1 in 4 events a browse, string ids and
    epoch-second timestamps. The catalog size stays ``items`` however many events there are."""
    rng = np.random.default_rng(seed)
    topics = max(1, items // 250)
    per_topic = max(1, items // topics)
    first_user, made = 0, 0
    while made < events:
        target = min(chunk_events, events - made)
        lengths = np.clip(rng.geometric(1.0 / mean_clicks, size=max(1, 2 * target // mean_clicks)), 3, 20 * mean_clicks)
        lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), target)) + 1)]
        n = int(lengths.sum())
        user = np.repeat(np.arange(first_user, first_user + len(lengths)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        moves = rng.random(n) < 0.1
        moves[starts] = False
        topic = (
            np.repeat(rng.integers(0, topics, len(lengths)), lengths)
            + np.cumsum(moves)
            - np.repeat(np.cumsum(moves)[starts], lengths)
        ) % topics
        item = topic * per_topic + np.minimum(rng.zipf(1.3, n) - 1, per_topic - 1)
        gaps = rng.exponential(3600.0, n).astype(np.int64) + 1
        gaps[starts] = rng.integers(0, 86400 * 365, len(lengths))
        stamps = START + np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts] - gaps[starts], lengths)
        event = np.where(rng.random(n) < 0.25, "browse", "click")
        yield pa.table(
            {
                "user_id": pa.array(np.char.add("u", user.astype(str))),
                "item_id": pa.array(np.char.add("i", item.astype(str))),
                "timestamp": pa.array(stamps),
                "event": pa.array(event),
            }
        )
        first_user += len(lengths)
        made += n

"""User state: the stores on a real redis-server (password on, append-only with fsync always),
`ray-rec state load`, and recommending by user id through a real Serve app over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pyarrow.parquet as pq
import pytest
import requests

from bench.redis_server import RedisServer
from bench.serve_kill import replica_pids
from ray_rec import load_model
from ray_rec.config import ServeConfig, StateConfig
from ray_rec.serve.client import retrying_session
from ray_rec.serve.state import Event, MemoryStore, RedisStore, StateUnavailable

from .conftest import REDIS_PASSWORD_ENV, REDIS_URL_ENV, free_port, record

URL_ENV, PASSWORD_ENV = REDIS_URL_ENV, REDIS_PASSWORD_ENV


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def redis_store(server: RedisServer, **kw) -> RedisStore:  # type: ignore[no-untyped-def]
    return RedisStore(server.url, server.password, **{"max_events": 3, "timeout_s": 0.5, "prefix": f"t{time.monotonic_ns()}:", **kw})


@pytest.fixture(params=["memory", "redis"])
def make_store(request, redis_server):  # type: ignore[no-untyped-def]
    """A factory of empty stores of one backend (each Redis one under its own key prefix)."""
    if request.param == "memory":
        return lambda **kw: MemoryStore(**{"max_events": 3, **kw})
    return lambda **kw: redis_store(redis_server, **kw)


def test_a_store_keeps_each_users_newest_events_in_time_order(make_store):
    async def scenario():
        store = make_store()
        await store.append([Event("u1", "a", 10.0), Event("u1", 7, 30.0), Event("u2", "x", 5.0),
                            Event("u1", "late", 20.0), Event("u1", "b", 12.0, "browse")])
        assert await store.clicks(["u1", "u2", "nobody"]) == [[("a", 10.0), ("late", 20.0), (7, 30.0)], [("x", 5.0)], []]
        await store.append([Event("u1", "c", 40.0), Event("u1", "d", 50.0)])  # past max_events=3: the oldest go
        assert await store.clicks(["u1"]) == [[(7, 30.0), ("c", 40.0), ("d", 50.0)]]
        await store.append([Event("u1", "old", 1.0), Event("u1", "c", 40.0)])  # too old to keep; a retry: stored once
        assert await store.clicks(["u1"]) == [[(7, 30.0), ("c", 40.0), ("d", 50.0)]]
        seen = await store.history("u1")
        assert seen.browses == [("b", 12.0)] and [i for i, _ in seen.clicks] == [7, "c", "d"]  # an int id stays an int
        assert await store.forget("u1") is True and await store.forget("u1") is False
        assert (await store.history("u1")).clicks == [] and await store.clicks(["u2"]) == [[("x", 5.0)]]
        await store.close()

    run(scenario())


def test_a_users_events_expire_ttl_seconds_after_the_last_one(make_store):
    async def scenario():
        store = make_store(ttl_s=2)  # margins of 0.8 s: a loaded machine stalled a 1 s TTL's 0.4 s margin
        await store.append([Event("u", "a", 1.0)])
        await asyncio.sleep(1.2)
        await store.append([Event("u", "b", 2.0, "browse")])  # a browse keeps the user's clicks alive too
        await asyncio.sleep(1.2)
        assert await store.clicks(["u"]) == [[("a", 1.0)]]
        await asyncio.sleep(3.0)
        assert await store.clicks(["u"]) == [[]] and (await store.history("u")).browses == []
        await store.close()

    run(scenario())


def test_a_write_redis_refuses_is_not_acknowledged(redis_server):
    """A key under the store's prefix that something else wrote with another type: the write fails
    with Redis's reason (the events endpoint then answers 503, so the client sends them again)."""
    async def scenario():
        store = redis_store(redis_server)
        redis_server.client().set(f"{store.prefix}{{u2}}:click", "not a set")
        with pytest.raises(StateUnavailable, match="WRONGTYPE"):
            await store.append([Event("u1", "a", 1.0), Event("u2", "b", 2.0)])
        await store.close()

    run(scenario())


def test_a_store_that_is_down_or_refuses_the_password_fails_fast(redis_server):
    async def scenario(store: RedisStore):
        t0 = time.monotonic()
        with pytest.raises(StateUnavailable):
            await store.clicks(["u"])
        with pytest.raises(StateUnavailable):
            await store.append([Event("u", "a", 1.0)])
        await store.close()
        return time.monotonic() - t0

    wrong = RedisStore(redis_server.url, "wrong-password", max_events=3, timeout_s=0.5)
    assert run(scenario(wrong)) < 10  # an answer, not a hang
    down = RedisStore(f"redis://127.0.0.1:{free_port()}/0", None, max_events=3, timeout_s=0.5)
    assert run(scenario(down)) < 10


def test_the_config_holds_no_redis_secret_and_names_a_missing_variable(monkeypatch):
    from ray_rec.serve.state import open_store

    with pytest.raises(ValueError, match="environment variable"):
        ServeConfig(model_uri="m", state={"backend": "redis", "url": "redis://:pw@host:6379"})
    with pytest.raises(ValueError, match="environment variable"):
        StateConfig(backend="redis", password="pw")
    monkeypatch.delenv("RAY_REC_REDIS_URL", raising=False)
    with pytest.raises(ValueError, match="RAY_REC_REDIS_URL"):
        open_store(StateConfig(backend="redis"))
    assert isinstance(open_store(StateConfig()), MemoryStore)  # the embedded default


# ------------------------------------------------------------------------------ ray-rec state load


def latest_sequences(data: str) -> dict[str, list]:
    """Each user's longest row over the data set's splits, as (raw item id, event) pairs."""
    from ray_rec.data.manifest import read_manifest
    from ray_rec.vocab import Vocabulary

    vocab, manifest = Vocabulary.load(data), read_manifest(data)
    out: dict[str, list] = {}
    for split in ("train", "valid", "test"):
        for rel in manifest.files[split]:
            for row in pq.read_table(os.path.join(data, rel)).to_pylist():
                seq = [(vocab.raw_id(i), e, t) for i, e, t in zip(row["items"], row["events"], row["timestamps"])]
                if len(seq) >= len(out.get(row["user_id"], [])):
                    out[row["user_id"]] = seq
    return out


@pytest.mark.parametrize("split", ["leave_one_out", "time"])
def test_state_load_writes_every_users_latest_history(split, tiny_logs, tmp_path, redis_server, ray_cluster, monkeypatch,
                                                     capsys):
    from ray_rec.cli import main
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.serve.state import decode

    data = str(tmp_path / "data")
    cutoff = None
    if split == "time":
        stamps = sorted(pq.read_table(tiny_logs / "events.parquet").column("timestamp").to_pylist())
        cutoff = stamps[int(len(stamps) * 0.8)]
        cutoff = int(datetime.fromisoformat(cutoff.replace("Z", "+00:00")).timestamp())  # the log's times are ISO 8601
    prepare(PrepareOptions(input=str(tiny_logs / "events.parquet"), output=data, num_shards=2, split=split, cutoff=cutoff))
    monkeypatch.setenv("RAY_REC_REDIS_PASSWORD", redis_server.password)
    prefix = f"load-{split}:"
    assert main(["state", "load", "--data", data, "--redis", redis_server.url, "--max-events", "8", "--key-prefix", prefix]) == 0
    assert "latest histories in Redis" in capsys.readouterr().out
    client = redis_server.client()
    want = latest_sequences(data)
    assert want and len(client.keys(f"{prefix}*:click")) == len(want)
    for user, seq in want.items():
        for kind, event in (("click", 1), ("browse", 0)):
            stored = [decode(e) for e in client.zrange(f"{prefix}{{{user}}}:{kind}", 0, -1)]
            assert stored == [(item, float(t)) for item, e, t in seq if e == event][-8:], (user, kind)


def test_state_load_refuses_a_password_on_the_command_line_and_a_wrong_one(tiny_data, redis_server, monkeypatch, capsys):
    from ray_rec.cli import main

    with_password = redis_server.url.replace("redis://", f"redis://:{redis_server.password}@")
    assert main(["state", "load", "--data", tiny_data, "--redis", with_password]) == 2
    assert "RAY_REC_REDIS_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("RAY_REC_REDIS_PASSWORD", "wrong")
    assert main(["state", "load", "--data", tiny_data, "--redis", redis_server.url]) == 2
    err = capsys.readouterr().err
    assert "did not answer" in err and "wrong" not in err.split("did not answer", 1)[0]


# ------------------------------------------------------------------------------ through Serve


def state_args(**kw) -> dict:  # type: ignore[no-untyped-def]
    return {"backend": "redis", "url_env": URL_ENV, "password_env": PASSWORD_ENV, "timeout_s": 0.5, **kw}


@pytest.fixture(scope="module")
def service(trained, ray_cluster, redis_server):
    """The app with its user state in the test Redis, plus the same app again at /b (another
    replica of the same deployment settings, on the same Redis)."""
    from ray import serve

    from ray_rec.serve.app import application
    from ray_rec.serve.local import start

    serve.shutdown()
    state = state_args(max_events=10_000)  # the load tests below must not see their events capped
    url = start(trained.model_uri, port=free_port(), request_timeout_s=10, state=state)
    serve.run(application(ServeConfig(model_uri=trained.model_uri, state=state)), name="b", route_prefix="/b")
    yield url
    for app in ("ray_rec", "b"):
        serve.delete(app)
    serve.shutdown()


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=30)


def send_events(url: str, user: str, items: list, stamps: list, event: str = "click") -> requests.Response:
    r = post(url, "/v1/events", {"events": [{"user_id": user, "item_id": i, "timestamp": t, "event": event}
                                             for i, t in zip(items, stamps)]})
    assert r.status_code == 200, r.text
    return r


@pytest.mark.slow
def test_recommend_by_user_id_equals_the_explicit_history_answer(service, trained):
    rec = load_model(trained.model_uri)
    items, stamps = ["i3", "i9", "i4", "i17"], [1_700_000_000, 1_700_000_050, 1_700_003_600, 1_700_003_700]
    r = send_events(service, "alice", items[:2] + ["new-item"], stamps[:2] + [1_700_000_060])
    assert r.json() == {"stored": 3, "users": 1, "unknown_items": 1}
    send_events(service, "alice", items[2:], stamps[2:])
    send_events(service, "alice", ["i40"], [1_700_003_650], event="browse")
    history = items[:2] + ["new-item"] + items[2:]
    times = stamps[:2] + [1_700_000_060] + stamps[2:]
    by_id = post(service, "/v1/recommend", {"user_id": "alice", "k": 5}).json()
    explicit = post(service, "/v1/recommend", {"history": history, "timestamps": times, "k": 5}).json()
    assert by_id["stored_clicks"] == 5 and by_id["unknown_history"] == ["new-item"]
    assert [i["item_id"] for i in by_id["items"]] == [i["item_id"] for i in explicit["items"]]
    assert [i["score"] for i in by_id["items"]] == pytest.approx([i["score"] for i in explicit["items"]], abs=1e-5)
    assert [i for i, _ in rec.recommend([history], k=5, timestamps=[times])[0]] == [i["item_id"] for i in by_id["items"]]
    cands = ["i2", "i30", "nope"]
    by_id = post(service, "/v1/score", {"user_id": "alice", "candidates": cands}).json()
    assert by_id["scores"] == pytest.approx(rec.score([history], [cands], timestamps=[times])[0], abs=1e-5)
    # The request's own items follow the stored ones, for this request only.
    both = post(service, "/v1/recommend", {"user_id": "alice", "history": ["i50"], "timestamps": [1_700_009_000],
                                           "k": 5, "explain": True}).json()
    plus = rec.recommend([history + ["i50"]], k=5, timestamps=[times + [1_700_009_000]], explain=True)[0]
    assert [i["item_id"] for i in both["items"]] == [i for i, _, _ in plus]
    assert [[b["position"] for b in i["because"]] for i in both["items"]] == [[r.position for r in why] for _, _, why in plus]
    assert post(service, "/v1/recommend", {"user_id": "alice", "k": 5}).json()["stored_clicks"] == 5
    # Another app (another replica) on the same Redis reads the same state, and so does GET.
    assert post(service + "/b", "/v1/recommend", {"user_id": "alice", "k": 5}).json()["items"] == by_id_items(service)
    stored = requests.get(service + "/b/v1/users/alice", timeout=30).json()
    assert [c["item_id"] for c in stored["clicks"]] == history and [b["item_id"] for b in stored["browses"]] == ["i40"]


def by_id_items(url: str) -> list:
    return post(url, "/v1/recommend", {"user_id": "alice", "k": 5}).json()["items"]


@pytest.mark.slow
def test_events_and_user_requests_are_checked_and_a_user_can_be_forgotten(service, trained):
    bad = {"events": [{"user_id": "bob", "item_id": "i1"}, {"user_id": "bob", "item_id": "i2", "event": "purchase"}]}
    r = post(service, "/v1/events", bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "events", 1]
    assert requests.get(service + "/v1/users/bob", timeout=30).json()["clicks"] == []  # nothing of the batch stored
    for body in ({"events": []}, {"events": [{"user_id": "", "item_id": "i1"}]},
                 {"events": [{"user_id": "bob", "item_id": "i1", "timestamp": -5}]}):
        assert post(service, "/v1/events", body).status_code == 422, body
    # An unknown user: the popularity answer, not an error; neither id nor history: 422.
    rec = load_model(trained.model_uri)
    r = post(service, "/v1/recommend", {"user_id": "nobody", "k": 3}).json()
    assert r["fallback"] == "popularity" and r["stored_clicks"] == 0
    assert [i["item_id"] for i in r["items"]] == [i for i, _ in rec.popular(3)]
    assert post(service, "/v1/recommend", {"k": 3}).status_code == 422
    assert post(service, "/v1/score", {"user_id": "nobody", "candidates": ["i1"]}).json()["fallback"] == "popularity"
    # Events without a time are stamped on arrival; DELETE erases everything of the user.
    send_events(service, "bob", ["i1", "i2"], [None, None])
    assert [c["timestamp"] > 1.7e9 for c in requests.get(service + "/v1/users/bob", timeout=30).json()["clicks"]] == [True, True]
    assert requests.delete(service + "/v1/users/bob", timeout=30).json() == {"user_id": "bob", "erased": True}
    assert requests.get(service + "/b/v1/users/bob", timeout=30).json()["clicks"] == []
    assert post(service, "/v1/recommend", {"user_id": "bob", "k": 3}).json()["fallback"] == "popularity"


def acked_sender(url: str, user: str, stop: threading.Event, acked: list, lock: threading.Lock) -> None:
    """Send one event at a time (each its own timestamp) until ``stop``; note those answered 200."""
    session = retrying_session()
    n = 0
    while not stop.is_set():
        n += 1
        try:
            r = session.post(url + "/v1/events", json={"events": [{"user_id": user, "item_id": f"i{n % 60}", "timestamp": n}]},
                             timeout=30)
        except requests.RequestException:
            continue
        if r.status_code == 200:
            with lock:
                acked.append((user, float(n)))
        time.sleep(0.01)


def stored_times(server: RedisServer, prefix: str, users: list[str]) -> set:
    from ray_rec.serve.state import decode

    client = server.client()
    return {(u, decode(e)[1]) for u in users for e in client.zrange(f"{prefix}{{{u}}}:click", 0, -1)}


@pytest.mark.slow
def test_a_replica_killed_while_events_arrive_loses_no_acknowledged_event(service, trained, redis_server):
    from ray import serve

    from ray_rec.serve.app import RecommenderService, deployment_options

    prefix = "kill:"
    args = ServeConfig(model_uri=trained.model_uri, state=state_args(key_prefix=prefix, max_events=10_000))
    two = RecommenderService.options(**{**deployment_options(args), "num_replicas": 2}).bind(args.model_dump())  # type: ignore[attr-defined]
    serve.run(two, name="two", route_prefix="/two")
    try:
        pids = replica_pids("two", 2)
        assert len(pids) == 2, pids
        stop, lock, acked = threading.Event(), threading.Lock(), []
        users = [f"k{i}" for i in range(6)]
        with ThreadPoolExecutor(len(users)) as pool:
            for user in users:
                pool.submit(acked_sender, service + "/two", user, stop, acked, lock)
            time.sleep(3)
            before = len(acked)
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(8)
            stop.set()
        assert before > 0 and len(acked) > before, "the load did not run across the kill"
        lost = set(acked) - stored_times(redis_server, prefix, users)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged events lost"
        record("Serve replica SIGKILL while events arrive, 2 replicas on Redis (6 clients)", faults=1, survived=1,
               events_acknowledged=len(acked), acknowledged_after_kill=len(acked) - before, acknowledged_lost=0)
    finally:
        serve.delete("two")


@pytest.mark.slow
def test_redis_killed_and_restarted_loses_nothing_acknowledged_and_answers_503_only_for_id_requests(service, trained,
                                                                                                    redis_server):
    """SIGKILL redis-server (appendfsync always) while events arrive; while it is down, a request
    with a history is answered, one by id alone gets 503 (quickly); after the restart every
    acknowledged event is there and requests by id are answered again."""
    stop, lock, acked = threading.Event(), threading.Lock(), []
    users = [f"r{i}" for i in range(4)]
    with ThreadPoolExecutor(len(users)) as pool:
        for user in users:
            pool.submit(acked_sender, service, user, stop, acked, lock)
        time.sleep(2)
        redis_server.kill()
        down_from = len(acked)
        t0 = time.monotonic()
        by_id = post(service, "/v1/recommend", {"user_id": "r0", "k": 3})
        waited = time.monotonic() - t0
        explicit = post(service, "/v1/recommend", {"user_id": "r0", "history": ["i1"], "k": 3})
        alone = post(service, "/v1/recommend", {"history": ["i1"], "k": 3})
        gone = requests.get(service + "/v1/users/r0", timeout=30)
        time.sleep(2)
        redis_server.start()  # reads its append-only file back
        time.sleep(3)
        stop.set()
    assert by_id.status_code == 503 and waited < 10, (by_id.status_code, waited)
    assert explicit.status_code == 200 and explicit.json()["stored_clicks"] is None
    assert alone.status_code == 200 and gone.status_code == 503
    assert down_from > 0 and len(acked) > down_from, "no event was acknowledged after the restart"
    lost = set(acked) - stored_times(redis_server, "ray_rec:user:", users)
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged events lost"
    deadline = time.monotonic() + 10
    while (r := post(service, "/v1/recommend", {"user_id": "r0", "k": 3})).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["stored_clicks"] > 0
    record("redis-server SIGKILL and restart while events arrive (appendfsync always, 4 clients)", faults=1, survived=1,
           events_acknowledged=len(acked), acknowledged_after_restart=len(acked) - down_from, acknowledged_lost=0,
           id_request_while_down="503", id_request_answer_s=round(waited, 2), history_request_while_down="200")


def test_serve_with_redis_state_fails_before_ray_starts_when_redis_is_not_there(tmp_path, monkeypatch, capsys):
    from ray_rec.cli import main

    from .conftest import tiny_artifact

    model = tiny_artifact(tmp_path / "model")
    monkeypatch.delenv("RAY_REC_REDIS_URL", raising=False)
    assert main(["serve", "--model", model, "--state", "redis"]) == 2
    assert "RAY_REC_REDIS_URL" in capsys.readouterr().err
    monkeypatch.setenv("RAY_REC_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["serve", "--model", model, "--state", "redis"]) == 2
    assert "did not answer" in capsys.readouterr().err

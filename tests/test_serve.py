"""Real HTTP against a real Serve app running a trained artifact."""

from __future__ import annotations

import pytest
import requests

from ray_rec import load_model

from .conftest import API_KEY, API_KEY_ENV, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(trained, ray_cluster):
    from ray import serve

    from ray_rec.serve.local import start

    port = free_port()
    url = start(trained.model_uri, port=port, max_candidates=50, max_k=20, max_history=100, max_body_bytes=4096)
    yield url
    serve.delete("ray_rec")
    serve.shutdown()


def post(url, path, body, **kw):
    return requests.post(url + path, json=body, timeout=30, **kw)


def test_score_and_recommend_match_the_python_api(service, trained):
    rec = load_model(trained.model_uri)
    history = ["i1", "i5", "i7", "unknown-item"]
    cands = ["i2", "i3", "nope", "i9"]
    r = post(service, "/v1/score", {"history": history, "candidates": cands})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == rec.version
    assert body["unknown_history"] == ["unknown-item"] and body["unknown_candidates"] == ["nope"]
    expected = rec.score([history], [cands])[0]
    assert body["scores"][2] is None
    assert [body["scores"][i] for i in (0, 1, 3)] == pytest.approx([expected[i] for i in (0, 1, 3)], rel=1e-4, abs=1e-5)
    r = post(service, "/v1/recommend", {"history": history, "k": 5})
    assert r.status_code == 200, r.text
    got = [(i["item_id"], i["score"]) for i in r.json()["items"]]
    want = rec.recommend([history], k=5)[0]
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-4, abs=1e-5)
    # A history longer than the model reads: every seen item is still excluded, as in the Python API.
    long = [f"i{i}" for i in range(55)]  # of the catalog's 60 items, i0 to i59
    assert rec.config.history_len < len(long) and len(rec.vocab) == 60
    r = post(service, "/v1/recommend", {"history": long, "k": 10})
    assert r.status_code == 200, r.text
    got_ids = [i["item_id"] for i in r.json()["items"]]
    assert sorted(got_ids) == [f"i{i}" for i in range(55, 60)]  # only the unseen are left
    assert got_ids == [i for i, _ in rec.recommend([long], k=10)[0]]
    # Click times reach the model as in the Python API (this model was trained on data with times).
    stamps = [1_700_000_000, 1_700_000_040, 1_700_007_200, 1_700_007_260]
    assert rec.model.features.time is not None
    r = post(service, "/v1/score", {"history": history, "candidates": cands, "timestamps": stamps})
    timed = rec.score([history], [cands], timestamps=[stamps])[0]
    assert timed != expected
    assert [r.json()["scores"][i] for i in (0, 1, 3)] == pytest.approx([timed[i] for i in (0, 1, 3)], rel=1e-4, abs=1e-5)
    r = post(service, "/v1/recommend", {"history": history, "k": 5, "timestamps": stamps})
    want = rec.recommend([history], k=5, timestamps=[stamps])[0]
    assert [(i["item_id"], pytest.approx(i["score"], rel=1e-4, abs=1e-5)) for i in r.json()["items"]] == want


def test_concurrent_mixed_requests_are_all_answered(service):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        if i % 2:
            times = {"timestamps": [1_700_000_000, 1_700_000_000 + 60 * i]} if i % 4 == 1 else {}  # batches mix both
            return post(service, "/v1/score", {"history": ["i1", f"i{i % 50}"], "candidates": ["i2", "i3"], **times}).status_code
        return post(service, "/v1/recommend", {"history": [f"i{i % 50}"], "k": 3}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64


def test_explanations_through_batches_that_mix_explained_and_plain_requests(service, trained):
    from concurrent.futures import ThreadPoolExecutor

    rec = load_model(trained.model_uri)
    history = ["i1", "nope", "i5", "i7", "i9"]

    def one(i):
        if i % 4 == 0:
            return post(service, "/v1/recommend", {"history": history, "k": 3, "explain": True, "explain_top": 2})
        if i % 4 == 1:
            return post(service, "/v1/score", {"history": history, "candidates": ["i2", "x"], "explain": True})
        return post(service, "/v1/recommend", {"history": history, "k": 3})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(48)))
    assert [r.status_code for r in answers] == [200] * 48
    want = rec.recommend([history], k=3, explain=True, explain_top=2)[0]
    scored = rec.score([history], [["i2", "x"]], explain=True)[0]
    for i, r in enumerate(answers):
        body = r.json()
        if i % 4 == 0:
            assert [(x["item_id"], [(b["item_id"], b["position"]) for b in x["because"]]) for x in body["items"]] == \
                [(item, [(b.item_id, b.position) for b in why]) for item, _, why in want]
            assert [b["share"] for x in body["items"] for b in x["because"]] == \
                pytest.approx([b.share for _, _, why in want for b in why], rel=1e-3, abs=1e-4)
        elif i % 4 == 1:
            assert [[(b["item_id"], b["position"]) for b in row] for row in body["because"]] == \
                [[(b.item_id, b.position) for b in why] for _, why in scored]
            assert body["because"][1] == []  # the unknown candidate
        else:
            assert all(x.get("because") is None for x in body["items"])
    r = post(service, "/v1/recommend", {"history": history, "explain": True, "explain_top": 0})
    assert r.status_code == 422 and "explain_top=0" in r.text


@pytest.mark.parametrize(
    "path,body,code,needle",
    [
        ("/v1/score", b"{not json", 422, ""),
        ("/v1/score", {"history": "i1", "candidates": ["i2"]}, 422, ""),
        ("/v1/score", {"history": [1.5], "candidates": ["i2"]}, 422, ""),
        ("/v1/score", {"history": [], "candidates": ["i2"]}, 422, "history is empty"),
        ("/v1/score", {"history": ["i1"], "candidates": []}, 422, "candidates is empty"),
        ("/v1/score", {"history": ["i1"], "candidates": ["i2"] * 51}, 422, "limit is 50"),
        ("/v1/score", {"history": ["i1"] * 101, "candidates": ["i2"]}, 422, "limit is 100"),
        ("/v1/recommend", {"history": ["i1"], "k": 0}, 422, "k=0"),
        ("/v1/recommend", {"history": ["i1"], "k": 21}, 422, "k=21"),
        ("/v1/recommend", {"history": ["i1"], "k": 5, "extra": 1}, 422, ""),
        ("/v1/recommend", {"history": ["i1"] * 3000}, 413, "over 4096 bytes"),
        ("/v1/recommend", {"history": ["i1", "i2"], "timestamps": [1]}, 422, "timestamps has 1 values for 2 history items"),
        ("/v1/score", {"history": ["i1", "i2"], "candidates": ["i3"], "timestamps": [5, 1]}, 422, "must be oldest first"),
        # Python's JSON parser reads Infinity and NaN (JSON has neither); the 422 never echoes input, so
        # there is nothing for JSON to fail on
        ("/v1/score", b'{"timestamps": [Infinity]}', 422, '"loc":["body","candidates"],"msg":"Field required"'),
        ("/v1/recommend", b'{"history": ["i1"], "timestamps": [NaN]}', 422, "finite number"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(service, path, body, code, needle):
    if isinstance(body, bytes):
        r = requests.post(service + path, data=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = post(service, path, body)
    assert r.status_code == code, r.text
    assert needle in r.text


def test_long_histories_keep_the_most_recent_items(service, trained):
    rec = load_model(trained.model_uri)
    long = [f"i{i % 60}" for i in range(90)]
    r = post(service, "/v1/score", {"history": long, "candidates": ["i1"]})
    assert r.json()["scores"] == pytest.approx(rec.score([long[-rec.config.history_len:]], [["i1"]])[0], rel=1e-4, abs=1e-5)


def test_unknown_history_falls_back_to_popularity(service):
    r = post(service, "/v1/recommend", {"history": ["never-seen"], "k": 3})
    assert r.status_code == 200 and r.json()["fallback"] == "popularity" and len(r.json()["items"]) == 3
    top = r.json()["items"][0]
    r = post(service, "/v1/score", {"history": ["never-seen"], "candidates": [top["item_id"], "nope"]})
    assert r.json()["fallback"] == "popularity" and r.json()["scores"] == [top["score"], None]
    r = post(service, "/v1/score", {"history": [top["item_id"]], "candidates": [top["item_id"]]})
    assert r.json()["fallback"] is None


def test_model_info_health_and_openapi(service, trained):
    info = requests.get(service + "/v1/model", timeout=10).json()
    assert info["catalog_size"] == load_model(trained.model_uri).config.num_items
    assert info["lineage"] == load_model(trained.model_uri).info["lineage"] and info["lineage"]["workers"] == 2
    assert requests.get(service + "/healthz", timeout=10).json()["status"] == "ok"
    paths = requests.get(service + "/openapi.json", timeout=10).json()["paths"]
    assert {"/v1/score", "/v1/recommend", "/v1/model", "/healthz"} <= set(paths)


def test_api_key_is_required_except_for_health(service, trained):
    from ray import serve

    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    serve.run(build_app(ServeArgs(model_uri=trained.model_uri, api_key_env=API_KEY_ENV)), name="keyed", route_prefix="/keyed")
    url = service + "/keyed"
    body = {"history": ["i1"], "k": 2}
    assert post(url, "/v1/recommend", body).status_code == 401
    assert post(url, "/v1/recommend", body, headers={"X-API-Key": "wrong"}).status_code == 401
    assert post(url, "/v1/recommend", body, headers={"X-API-Key": API_KEY}).status_code == 200
    assert requests.get(url + "/v1/model", timeout=10).status_code == 401
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    for page in ("/docs", "/redoc", "/openapi.json"):  # the schema and docs pages too
        assert requests.get(url + page, timeout=10).status_code == 401
        assert requests.get(url + page, headers={"X-API-Key": API_KEY}, timeout=10).status_code == 200
    serve.delete("keyed")


def test_hostile_bodies_get_small_clear_answers(service, trained):
    """A 300 KB body of empty objects (it gave a 21.8 MB answer and took 17.5 s) and a lone
    surrogate id (it gave a 500) both get a small 422, over real HTTP."""
    from ray import serve

    from ray_rec.serve.app import build_app
    from ray_rec.serve.schemas import ServeArgs

    serve.run(build_app(ServeArgs(model_uri=trained.model_uri, max_body_bytes=1_000_000)), name="big", route_prefix="/big")
    url = service + "/big"
    body = '{"history": [' + ", ".join(["{}"] * 75_000) + '], "candidates": ["i1"]}'
    assert len(body) > 300_000
    r = requests.post(url + "/v1/score", data=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422 and len(r.content) < 2000, (r.status_code, len(r.content))
    for raw in ('{"history": ["\\ud800"], "candidates": ["i1"]}', '{"history": ["i1"], "k": 2, "\\ud800\\u001b": 1}'):
        r = requests.post(url + "/v1/recommend", data=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 422, (raw, r.status_code, r.text[:200])
        assert r.json()["detail"]
    serve.delete("big")


NICENESS = """
import os, ray
from ray_rec.ray_session import init_ray

@ray.remote
def niceness():
    return os.nice(0)

for serving in (True, False):
    init_ray(1, serving=serving)
    print(os.nice(0), ray.get(niceness.remote()))
    ray.shutdown()
"""


def test_a_local_ray_started_to_serve_runs_its_workers_at_the_drivers_priority():
    """Ray starts its workers at niceness 15; the Ray that `ray-rec serve` and the demo start runs
    them at the driver's, so busy cores cannot starve the Serve proxy past its start-up deadline
    (`python -m bench.serve_start`). Other local Rays keep Ray's default."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_worker_niceness")}
    out = subprocess.run([sys.executable, "-c", NICENESS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (driver, serving), (driver_again, default) = [[int(n) for n in line.split()] for line in out.stdout.splitlines()[:2]]
    assert serving == driver and default > driver_again


def test_a_serve_config_s_import_path_builds_the_app_from_its_args():
    """`serve deploy`/`serve run` call `build_app` as an application builder (one argument, the
    config's ``args``) through Serve's own function for it; bad args are refused by name."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    from ray_rec.serve.app import build_app

    app = call_user_app_builder_with_args_if_necessary(build_app, {"model_uri": "s3://b/model", "device": "cpu"})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="device"):
        call_user_app_builder_with_args_if_necessary(build_app, {"model_uri": "s3://b/model", "device": "gpu"})

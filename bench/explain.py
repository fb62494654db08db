"""Are explanations faithful, and what do they cost?

Faithfulness, on the test users of a data set (each user's history without its held-out click, at
least 4 clicks): the default model, trained as `ray-rec train` trains it (no final fit), recommends
its top item; each attribution method names its 3 clicks; then three deletions are compared, each of
3 clicks of the window the model reads: the 3 attributed, 3 drawn at random (seeded), the 3 most
recent. After each, the recommended item's score and its rank over the catalog (the original
history's items excluded, as the recommendation excluded them: rank 1 before) are measured again.
Beside the product's methods, a greedy leave-one-out (3 passes: each time the click whose
deletion drops the score most from what is left) for comparison with ``best_set``'s search. A
method *wins* on a user when, against each baseline, its deletion drops the item's rank at least as
far and its score further by more than `TIE` (a rank is often unmoved by every deletion: the score
breaks the tie);
``rank_wins`` counts the users where the rank alone dropped strictly further than under both.

Cost: milliseconds per query of ``predict`` with and without an explanation in batches of 32, in
process, per method; and the Serve endpoint (`ray-rec serve`'s app, the product's ingress),
``/v1/recommend`` with a median-length history and with the longest window the model reads (its
``history_len`` clicks, from the longest test history), at concurrency 1 and 32, explain on and off,
alternating, medians of the rounds.

    python -m bench.explain --dataset Beauty
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.model_quality import CACHE, MODEL_REVISION, prepared
from bench.output import machine, write_result
from ray_rec.config import load_config, parse_overrides
from ray_rec.data.examples import _Clicks
from ray_rec.data.local import read_split
from ray_rec.predict import Query, Recommender, explain, load_model, ranking
from ray_rec.predict.explain import METHODS
from ray_rec.predict.inputs import pad_rows, window

DELETED = 3
GREEDY = "greedy leave-one-out"
# A score lower by less is the same score: the same history scored in another batch differs by ~1e-6
# (a baseline's own 3 clicks, or another set leaving the same history, must not beat it).
TIE = 1e-4
CEILING_POOL = 12  # clicks whose every 3-click set `ceiling` tries: C(12, 3) = 220 deletions per user


def trained_model(data: str, dataset: str, overrides: dict[str, Any]) -> str:
    """The default model on ``data`` (cached per data set, model revision and overrides)."""
    from ray_rec.model.artifact import save_model
    from ray_rec.train.local import train_local
    from ray_rec.vocab import Vocabulary

    tag = "-".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    folder = CACHE / f"explain-{dataset}-r{MODEL_REVISION}{'-' + tag if tag else ''}"
    if not (folder / "config.json").exists():  # written last by save_model
        run = train_local(data, load_config(None, {"train.final_fit": False, **overrides}), evaluate_test=False,
                          log=lambda m: print(f"[explain] {m}", flush=True))
        save_model(run.model, Vocabulary.load(data), str(folder))
    return str(folder)


def test_histories(data: str, users: int, seed: int) -> list[list[int]]:
    """Up to ``users`` test histories (item indices, the held-out click removed) of at least 4 clicks."""
    clicks = _Clicks(read_split(data, "test"), 0)
    out = [clicks.items[clicks.offsets[r] : clicks.offsets[r + 1] - 1].tolist() for r in range(len(clicks.lengths))]
    out = [h for h in out if len(h) > DELETED]
    rng = np.random.default_rng(seed)
    return [out[i] for i in sorted(rng.choice(len(out), min(users, len(out)), replace=False))]


def ranks_after(rec: Recommender, histories: list[list[int]], item: list[int], seen: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Score of ``item[i]`` after ``histories[i]`` and its rank over the catalog without ``seen[i]``."""
    model, length = rec.model, rec.config.history_len
    scores, ranks = [], []
    with torch.inference_mode():
        for start in range(0, len(histories), 256):
            rows = slice(start, start + 256)
            u = ranking.interests(model, window(histories[rows], length))
            full = model.catalog_scores(u)
            excluded = pad_rows(seen[rows])
            full.scatter_(1, excluded, float("-inf"))
            target = torch.tensor(item[rows])
            s = full.gather(1, target[:, None])[:, 0]
            full[:, 0] = float("-inf")
            scores.append(s.numpy())
            ranks.append(1 + (full > s[:, None]).sum(1).numpy())
    return np.concatenate(scores), np.concatenate(ranks)


def without(history: list[int], positions: list[int]) -> list[int]:
    drop = set(positions)
    return [x for i, x in enumerate(history) if i not in drop]


def faithfulness(rec: Recommender, histories: list[list[int]], seed: int) -> dict[str, Any]:
    length = rec.config.history_len
    methods = [m for m in METHODS if m != "attention" or rec.config.enhancer == "augru"]
    rng = np.random.default_rng(seed)
    base = rec.predict([Query(h, k=1) for h in histories])
    item = [a.items[0] for a in base]  # type: ignore[index]
    base_scores, base_ranks = ranks_after(rec, histories, item, histories)
    assert (base_ranks == 1).all(), "the recommended item ranks first over the catalog without the history"
    windows = [list(range(max(0, len(h) - length), len(h))) for h in histories]
    deletions = {"random": [sorted(rng.choice(w, DELETED, replace=False).tolist()) for w in windows],
                 "recent": [w[-DELETED:] for w in windows]}
    cost: dict[str, float] = {}
    for method in methods:
        t0 = time.perf_counter()
        found = []
        for start in range(0, len(histories), 32):
            found += rec.predict([Query(h, k=1, explain=DELETED) for h in histories[start : start + 32]], method)
        cost[method] = (time.perf_counter() - t0) * 1000 / len(histories)
        assert [a.items for a in found] == [a.items for a in base]
        deletions[method] = [sorted(p for p, _ in a.reasons[0]) for a in found]  # type: ignore[index]
    t0 = time.perf_counter()
    deletions[GREEDY] = greedy_deletions(rec, histories, item)
    cost[GREEDY] = (time.perf_counter() - t0) * 1000 / len(histories)
    t0 = time.perf_counter()
    for start in range(0, len(histories), 32):
        rec.predict([Query(h, k=1) for h in histories[start : start + 32]])
    cost["plain"] = (time.perf_counter() - t0) * 1000 / len(histories)
    after = {name: ranks_after(rec, [without(h, p) for h, p in zip(histories, pos)], item, histories)
             for name, pos in deletions.items()}
    out: dict[str, Any] = {"users": len(histories), "ms_per_query": cost, "deletions": {}}
    for name, (scores, ranks) in after.items():
        out["deletions"][name] = {"mean_rank_drop": float(np.mean(ranks - 1)), "median_rank_drop": float(np.median(ranks - 1)),
                                  "mean_score_drop": float(np.mean(base_scores - scores))}
    for method in [*methods, GREEDY]:
        score_drop, rank = base_scores - after[method][0], after[method][1]
        wins, rank_wins = np.ones(len(histories), bool), np.ones(len(histories), bool)
        for other in ("random", "recent"):
            other_drop, other_rank = base_scores - after[other][0], after[other][1]
            wins &= (rank >= other_rank) & (score_drop > other_drop + TIE)
            rank_wins &= rank > other_rank
        same = np.array([deletions[method][i] in (deletions["random"][i], deletions["recent"][i]) for i in range(len(histories))])
        out["deletions"][method].update({"wins": float(wins.mean()), "rank_wins": float(rank_wins.mean()),
                                         "same_clicks_as_a_baseline": float(same.mean()),
                                         "wins_where_the_clicks_differ": float(wins[~same].mean()) if (~same).any() else 0.0})
    out["ceiling"] = ceiling(rec, histories, item, [after["random"], after["recent"]])
    return out


def ceiling(rec: Recommender, histories: list[list[int]], item: list[int],
            baselines: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The share of users for whom *some* 3 clicks win (drop the rank at least as far and the score
    further than each baseline's (scores, ranks) after its deletion, by more than `TIE`), trying every
    3-click set of the window's `CEILING_POOL` clicks with the largest leave-one-out contributions:
    exact for windows of up to that many clicks. No choice of 3 clicks can win on more users than
    that (on the exact ones)."""
    found = explain.contributions(rec.model, [explain.Job(h, None, [t]) for h, t in zip(histories, item)])
    wins = []
    for u, (history, target, contribution) in enumerate(zip(histories, item, found)):
        first = len(history) - contribution.shape[1]
        pool = sorted(first + int(j) for j in np.argsort(-contribution[0], kind="stable")[:CEILING_POOL])
        sets = list(itertools.combinations(pool, DELETED))
        scores, ranks = ranks_after(rec, [without(history, list(s)) for s in sets], [target] * len(sets), [history] * len(sets))
        beats = np.ones(len(sets), bool)
        for other_scores, other_ranks in baselines:
            beats &= (ranks >= other_ranks[u]) & (scores < other_scores[u] - TIE)
        wins.append(bool(beats.any()))
    exact = [min(len(h), rec.config.history_len) <= CEILING_POOL for h in histories]
    return {"pool": CEILING_POOL, "some_set_wins": float(np.mean(wins)), "exact_users": float(np.mean(exact)),
            "some_set_wins_where_exact": float(np.mean([w for w, e in zip(wins, exact) if e])) if any(exact) else 0.0}


def greedy_deletions(rec: Recommender, histories: list[list[int]], item: list[int]) -> list[list[int]]:
    """3 clicks chosen one at a time, each the click whose deletion drops the item's score most from
    the history left by the earlier choices (leave-one-out 3 times; not a method of the product)."""
    left = [list(range(len(h))) for h in histories]
    chosen: list[list[int]] = [[] for _ in histories]
    for _ in range(DELETED):
        for start in range(0, len(histories), 32):
            rows = range(start, min(start + 32, len(histories)))
            jobs = [explain.Job([histories[u][p] for p in left[u]], None, [item[u]]) for u in rows]
            for u, found in zip(rows, explain.contributions(rec.model, jobs)):
                pick = left[u][len(left[u]) - found.shape[1] + int(np.argmax(found[0]))]
                chosen[u].append(pick)
                left[u].remove(pick)
    return [sorted(c) for c in chosen]


def serve_cost(uri: str, histories: list[list[str]], requests: int, rounds: int) -> list[dict[str, Any]]:
    """/v1/recommend through Serve with and without explain, concurrency 1 and 32, alternating; one
    result per history."""
    from ray_rec.ray_session import use_fast_ingress

    use_fast_ingress()
    from ray import serve

    from bench.serve_load import free_port, load
    from ray_rec.ray_session import init_ray
    from ray_rec.serve.local import start

    init_ray(1, serving=True)
    url = start(uri, "127.0.0.1", free_port())
    runs: list[dict[str, list[dict[str, Any]]]] = [{} for _ in histories]
    try:
        for _ in range(rounds):
            for history, run in zip(histories, runs):
                for concurrency in (1, 32):
                    for explain in (False, True):
                        body = {"history": history, "k": 10, "explain": explain}
                        total = requests // 4 if concurrency == 1 else requests
                        result = asyncio.run(load(f"{url}/v1/recommend", body, concurrency, total))
                        run.setdefault(f"c{concurrency}_{'explain' if explain else 'plain'}", []).append(result)
    finally:
        serve.shutdown()
    found = []
    for history, run in zip(histories, runs):
        out: dict[str, Any] = {k: {m: statistics.median(r[m] for r in v) for m in ("rps", "p50_ms", "p99_ms")}
                               | {"errors": sum(r["errors"] for r in v)} for k, v in run.items()}
        for c in (1, 32):
            out[f"c{c}_p50_ratio"] = out[f"c{c}_explain"]["p50_ms"] / out[f"c{c}_plain"]["p50_ms"]
        found.append(out | {"history_length": len(history)})
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="Beauty")
    parser.add_argument("--users", type=int, default=2000, help="test users sampled for faithfulness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training setting (e.g. train.epochs=2)")
    parser.add_argument("--requests", type=int, default=1000, help="requests per Serve measurement at concurrency 32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = prepared(args.dataset)
    overrides = parse_overrides(args.set)
    uri = trained_model(data, args.dataset, overrides)
    rec = load_model(uri, device="cpu")
    histories = test_histories(data, args.users, args.seed)
    report: dict[str, Any] = {"command": " ".join(["python -m bench.explain", *(argv if argv is not None else sys.argv[1:])]),
                              "machine": machine(), "dataset": args.dataset, "model": rec.config.describe(),
                              "method": explain.DEFAULT_METHOD}
    report["faithfulness"] = faithfulness(rec, histories, args.seed)
    print(f"[explain] faithfulness: {report['faithfulness']}", flush=True)
    lengths = sorted(len(h) for h in histories)
    median = next(h for h in histories if len(h) == lengths[len(lengths) // 2])
    longest = max(histories, key=len)[-rec.config.history_len :]  # the most clicks the model reads, if a user has them
    report["serve"] = serve_cost(uri, [[str(rec.vocab.raw_id(i)) for i in h] for h in (median, longest)],
                                 args.requests, args.rounds)
    print(f"[explain] serve: {report['serve']}", flush=True)
    path = write_result(f"explain_{args.dataset}.json", report)
    print(f"[explain] written to {path}")


if __name__ == "__main__":
    main()

"""BENCHMARKS.md and its plots from the JSON results the benchmarks wrote (nothing is re-measured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

KEYS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")


def _load(folder: Path, pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(pattern))]


def _source(report: dict[str, Any]) -> str:
    return f"_Command: `{report.get('command', '?')}`; machine: {report.get('machine', '?')}._"


def _plot(path: Path, draw: Any) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    draw(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # a legend placed below the axes is kept
    plt.close(fig)
    return path.name


def quality_table(r: dict[str, Any]) -> list[str]:
    """The quality table of one data set: a row per variant (mean over its seeds), then the ratio."""
    from bench.model_quality import MODEL_REVISION, revision_note

    out = ["| model | " + " | ".join(KEYS) + " | seeds | best epoch | seconds |", "|---" * (len(KEYS) + 4) + "|"]
    rows = r["rows"]
    revision = {name: row.get("model_revision", 1) for name, row in rows.items() if name != "popularity"}
    marks = {rev: "†" * (i + 1) for i, rev in enumerate(sorted({v for v in revision.values() if v != MODEL_REVISION}))}
    for name, row in rows.items():
        seeds = row.get("seeds", [0] if row.get("best_epoch") else [])
        ndcg = " | ".join(f"{row[k]:.4f}" + (f" ± {row['NDCG@10_std']:.4f}" if k == "NDCG@10" and len(seeds) > 1 else "")
                          for k in KEYS)
        epochs = ", ".join(str(e) for e in row.get("best_epochs", [row["best_epoch"]])) if seeds else "-"
        mark = marks.get(revision.get(name, MODEL_REVISION), "")
        out.append(f"| {name}{mark} | {ndcg} | {len(seeds) or '-'} | {epochs} | {row['seconds'] or '-'} |")
    for name, row in r.get("published", {}).items():
        out.append(f"| {name} (published) | " + " | ".join(f"{row[k]:.4f}" if k in row else "-" for k in KEYS) + " | - | - | - |")
    for name in rows:  # the ratio for each schedule both rows were trained under, by the same model code
        suffix = name.removeprefix("default")
        if name.startswith("default") and f"sasrec{suffix}" in rows and revision[name] == revision[f"sasrec{suffix}"]:
            ratio = rows[name]["NDCG@10"] / rows[f"sasrec{suffix}"]["NDCG@10"]
            out += ["", f"Default / SASRec-shaped NDCG@10{suffix}{marks.get(revision[name], '')}: **{ratio:.3f}x**."]
    for rev, mark in marks.items():
        out += ["", revision_note(rev, mark)]
    if any(len(row.get("seeds", [])) > 1 for row in rows.values()):
        out += ["", "Rows trained with several seeds (model initialisation and example order) show the mean, and "
                "NDCG@10 ± its standard deviation across seeds; seconds is the mean per seed."]
    return out


def curve(row: dict) -> list[dict]:
    """The training curve a row shows: its lowest seed's (an unseeded row's only one)."""
    histories = row.get("histories") or {}
    return histories[min(histories, key=int)] if histories else row.get("history") or []


def quality(folder: Path, rel: str) -> list[str]:
    from bench.model_quality import MODEL_REVISION

    out: list[str] = []
    for r in _load(folder, "model_quality_*.json"):
        ds = r["dataset"]
        out += [f"### {ds}", "", _source(r), "", *quality_table(r)]
        # The current model code's rows only: every row's curve made a legend taller than the figure.
        curves = {n: c for n, row in r["rows"].items()
                  if row.get("model_revision", 1) == MODEL_REVISION and (c := curve(row))}
        if curves:
            def draw(ax: Any, curves: dict = curves, ds: str = ds) -> None:
                for name, hist in curves.items():
                    pts = [(h["epoch"], h["val_NDCG@10"]) for h in hist if "val_NDCG@10" in h]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
                ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=f"{ds}: training curves (lowest seed per row)")
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, -0.25))
            name = _plot(folder / f"quality_{ds}.png", draw)
            if name:
                out += ["", f"![training curves]({rel}/{name})"]
        out.append("")
    return out


def relevance_cost(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "relevance_cost.json"):
        out += ["### Relevance network cost (Beauty)", "", _source(r), "",
                "| relevance | loss | training step ms (batch 128) | full catalog, 512 users, ms |", "|---|---|---|---|"]
        for name, row in r["rows"].items():
            out.append(f"| {name} | {row['loss']} | {row['step_ms']:.0f} | {row['catalog_512_users_ms']:,.0f} |")
        out.append("")
    return out


def enhancer_cost_table(r: dict[str, Any]) -> list[str]:
    """One `bench.enhancer_cost` result as a table: every data shape and enhancer, ratios to `none`."""
    out = ["| data | history length | enhancer | training step ms (batch 128) | top-10, 1 user, ms | top-10, 512 users, ms |",
           "|---|---|---|---|---|---|"]
    for name, shape in r["shapes"].items():
        for e, row in shape["rows"].items():
            ratio = row["ratio_to_none"]
            cells = [f"{row[k]:,.{1 if '1_user' in k else 0}f} ({ratio[k]:.2f}x)"
                     for k in ("step_ms", "recommend_1_user_ms", "recommend_512_users_ms")]
            out.append(f"| {name} | {shape['history_len']} | {e} | " + " | ".join(cells) + " |")
    return out


def enhancer_cost(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "enhancer_cost.json"):
        out += ["### Enhancement network cost", "", _source(r) + f" Torch threads: {r['threads']}; medians over the rounds, "
                "ratios against `none` (the SASRec-shaped model) taken within each round.", "",
                *enhancer_cost_table(r), ""]
    return out


def speed(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "train_speed_*.json"):
        plain = r["plain_examples_per_s"]
        runs = ", ".join(f"{x:,.0f}" for x in r.get("plain_runs", []))
        out += [f"### {r['dataset']}", "", _source(r), "",
                "| loop | examples/s | vs plain | fixed start-up s |", "|---|---|---|---|",
                f"| plain PyTorch, 1 process (median of {len(r.get('plain_runs', [plain]))} runs: {runs or f'{plain:,.0f}'}) "
                f"| {plain:,.0f} | 1.00x | - |"]
        for label, key in (("Ray Train, 1 worker", "ray_1_worker"),
                           ("Ray Train, 1 worker, streaming every epoch (`data.cache_mb=0`)", "ray_1_worker_streaming"),
                           ("Ray Train, 2 workers", "ray_2_workers")):
            if key not in r:
                continue
            row = r[key]
            ratio = row.get("vs_plain", row["examples_per_s"] / plain)
            runs_around = r.get("plain_runs", [])
            if "round" in row:  # the median round, against the plain runs just before and after it
                label += f" (median of {len(row['rounds'])} rounds: round {row['round']}, between plain runs " \
                         f"{runs_around[row['round'] - 1]:,.0f} and {runs_around[row['round']]:,.0f})"
            elif "vs_plain" in row and len(runs_around) > 1:
                label += f" (between plain runs {runs_around[-2]:,.0f} and {runs_around[-1]:,.0f})"
            out.append(f"| {label} | {row['examples_per_s']:,.0f} | {ratio:.2f}x | {row['fixed_s']:.1f} |")
        if "ratios_1_worker" in r:
            out += ["", "Plain-loop and 1-worker runs alternate; each Ray run is compared with the mean of the plain runs "
                    "just before and after it (the mean of those two is its 1.00x). 1 worker, per round: "
                    + ", ".join(f"{x:.2f}x" for x in r["ratios_1_worker"]) + f" (median **{r['ratio_1_worker']:.2f}x**); "
                    "the streaming and 2-worker runs are compared with the last two plain runs."]
        out.append("")
    return out


def shared_cores(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "shared_cores_*.json"):
        out += [f"### Training on shared cores ({r['dataset']})", "", _source(r), "",
                "| condition | threads | examples/s (median) | runs |", "|---|---|---|---|"]
        out += [f"| {row['label']} | {row['threads']} | {row['examples_per_s']:,.0f} | "
                + ", ".join(f"{x:,.0f}" for x in row["runs"]) + " |" for row in r["rows"]]
        out += ["", f"`OMP_WAIT_POLICY=PASSIVE` (what `ray_rec` sets for its Ray workers) against the policy left unset, "
                f"per round, median: **{r['passive_vs_unset_idle']:.2f}x** on idle cores, "
                f"**{r['passive_vs_unset_shared']:.2f}x** with {r['busy']} of {r['threads']} cores busy.", ""]
    return out


def loss_memory(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "loss_memory.json"):
        out += ["### Full-softmax loss: memory of one step", "", _source(r), "",
                "| catalog items | positions | way | peak memory over the start | step (forward + backward) | loss |",
                "|---|---|---|---|---|---|"]
        out += [f"| {row['items']:,} | {row['positions']:,} | {row['mode']} | {row['peak_mb']:,.0f} MB | "
                f"{row['step_s'] * 1000:,.0f} ms | {row['loss']:.4f} |" for row in r["rows"]]
        out.append("")
    return out


def sparse_items(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "sparse_items.json"):
        out += ["### Large catalogs: the item table's gradients sparse or dense", "", _source(r), "",
                f"One training step of {r['batch']} windows x 50 steps per worker, sampled softmax over 2048 uniform negatives "
                f"(plus up to 2048 of the batch's next clicks where the negatives say so); median of {r['steps'] - 1} steps "
                "after the first; the ratio is against the dense step (sparse) or the uniform-only step (in-batch).", "",
                "| catalog items | workers | item gradients | negatives | step | peak memory (rank 0) | loss after the steps |",
                "|---|---|---|---|---|---|---|"]
        rows = {(x["items"], x["workers"], x["mode"]): x for x in r["rows"]}
        for (items, workers, mode), x in rows.items():
            ratio = ""
            if mode == "sparse" and (items, workers, "dense") in rows:
                dense = rows[items, workers, "dense"]
                ratio = f" (speed-up over dense: {dense['step_s'] / x['step_s']:.2f}x)"
            elif mode == "uniform" and (items, workers, "sparse") in rows:
                ratio = f" (in-batch: {rows[items, workers, 'sparse']['step_s'] / x['step_s']:.2f}x this)"
            negatives = "uniform" if mode == "uniform" or "next clicks" not in x["loss_text"] else "uniform + in-batch"
            gradients = "dense" if mode == "dense" else "sparse"
            out.append(f"| {items:,} | {workers} | {gradients} | {negatives} | {x['step_s']:.3f} s{ratio} | "
                       f"{x['peak_mb']:,.0f} MB | {x['loss']:.4f} |")
        out.append("")
    return out


def learning_rate(history: list[dict[str, Any]]) -> str:
    """How a run's learning rate moved, from its epochs' records (each epoch records the rate after
    its validation, so a lower rate than the epoch before's is a halving after that epoch): runs from
    before training could halve it (`train.lr_patience`) recorded no rate, and ran at a constant one."""
    recorded = [h for h in history if "lr" in h]
    halvings = [h["epoch"] for prev, h in zip(recorded, recorded[1:]) if h["lr"] < prev["lr"]]
    if not halvings:
        return "constant" if recorded else "constant (not recorded)"
    return f"halved {len(halvings)}x (after epochs {', '.join(map(str, halvings))})"


def ray_runs(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "ray_train_*.json"):
        out += [f"### Full training runs on {r['dataset']} (`ray-rec train`, default config, then `ray-rec evaluate`)", "",
                _source(r), "", "| workers | batch (each worker) | learning rate | wall s | epochs (best) | examples/s | test HR@10 | "
                "test NDCG@10 | popularity NDCG@10 | 100 sampled NDCG@10 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for w, run in r["runs"].items():
            t = run["test"]
            full, pop, sampled = t["full_ranking"], t["popularity_full_ranking"], t["sampled_100"]
            b = run.get("batch")  # recorded since train.batch_size became the whole step's
            size = f"{b['step']} ({b['worker']})" if b else "not recorded"
            out.append(f"| {w} | {size} | {learning_rate(run['history'])} | {run['wall_s']:.0f} | {run['epochs']} ({run['best_epoch']}) | "
                       f"{run['examples_per_s']:,.0f} | {full['HR@10']:.4f} | {full['NDCG@10']:.4f} | {pop['NDCG@10']:.4f} | "
                       f"{sampled['NDCG@10']:.4f} |")
        out.append("")
    return out


def data(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "data_scale.json"):
        on_ray = all("import_ray" in row for row in r["sizes"].values())
        out += [_source(r), "", "| events | import s | import events/s | import peak RSS MB | "
                + ("import on Ray (1 node) events/s (vs local) | its largest process / all processes / object-store pages MB | " if on_ray else "")
                + "stream examples/s (S3 -> tensors) | stream peak MB (processes) | stream object-store pages MB |",
                "|---|---|---|---|" + ("---|---|" if on_ray else "") + "---|---|---|"]
        for size, row in sorted(r["sizes"].items(), key=lambda kv: int(kv[0])):
            imp, st = row["import"], row["stream"]
            ray_cells = ""
            if on_ray:
                x = row["import_ray"]
                ray_cells = (f"{x['events_per_s']:,.0f} ({x['events_per_s'] / imp['events_per_s']:.2f}x) | "
                             f"{x['peak_process_mb']:,.0f} / {x['peak_pss_mb']:,.0f} / {x['peak_object_store_pages_mb']:,.0f} | ")
            out.append(f"| {int(size):,} | {imp['seconds']:.0f} | {imp['events_per_s']:,.0f} | {imp['peak_rss_mb']:,.0f} | {ray_cells}"
                       f"{st['examples_per_s']:,.0f} | {st['peak_pss_mb']:,.0f} | {st.get('peak_object_store_pages_mb', 0):,.0f} |")
        t = r["train_step"]
        out += ["", f"Default model training step rate on the largest set ({t['catalog']:,} items, one process): "
                f"{t['examples_per_s']:,.0f} examples/s; pipeline / training = **{r['pipeline_over_training']:.1f}x**. "
                f"Peak memory, largest vs second-largest size: import {r['import_peak_growth']:.2f}x, "
                + (f"import on Ray (largest process) {r['import_ray_peak_growth']:.2f}x, " if "import_ray_peak_growth" in r else "")
                + f"stream {r['stream_peak_growth']:.2f}x.", ""]
    for r in _load(folder, "data_scale_nodes.json"):
        out += ["### The Ray engine on one node and on two", "", _source(r), "",
                f"A local multi-node Ray (`ray.cluster_utils.Cluster`: a head that takes no work, worker nodes of "
                f"{r['node_cpus']} logical CPUs and a 1 GB object store each, every node its own raylet), input and output "
                "on the loopback S3 server. All nodes share this machine's 2 cores, so a second node adds no speed here: "
                "the figures show the import spreading over the nodes with each node's memory flat as the log grows.", "",
                "| events | engine | events/s (vs local) | per node: peak MB (its processes) / largest process MB | "
                "read + split tasks by node |", "|---|---|---|---|---|"]
        for size, row in sorted(r["sizes"].items(), key=lambda kv: int(kv[0])):
            local = row["local"]
            out.append(f"| {int(size):,} | local | {local['events_per_s']:,.0f} | one process: {local['peak_rss_mb']:,.0f} (RSS) | - |")
            for name, x in row.items():
                if name == "local":
                    continue
                per_node = "; ".join(f"{p:,.0f} / {q:,.0f}" for p, q in zip(x["node_peak_pss_mb"], x["node_largest_process_mb"]))
                tasks = ", ".join(f"{k} {v}" for k, v in sorted(x["tasks_by_node"].items()))
                out.append(f"| {int(size):,} | Ray, {name.replace('1 nodes', '1 node')} | {x['events_per_s']:,.0f} ({x['events_per_s'] / local['events_per_s']:.2f}x) | "
                           f"{per_node} | {tasks} |")
        out.append("")
    return out


def _cold(r: dict) -> bool:
    """Whether a serve_load result measured its levels on open connections (and the c=128 opening apart)."""
    return "model_p99_c128_cold" in r["summary"].get("haproxy", {})


def serving(folder: Path, rel: str) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "serve_load.json"):
        out += [_source(r), "", f"Medians over {r.get('rounds', 1)} rounds of {r['requests_per_level']:,} requests a level; each "
                "round starts a fresh Ray per ingress (Serve's default proxy; HAProxy, as `ray-rec serve` runs) and runs "
                "bare uvicorn between them. "
                + ("Every client's connection is open before a level is measured." if _cold(r) else
                   "Four clients' connections were open before a level was measured; the others opened inside it."), "",
                "| setup | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for setup, levels in r["rows"].items():
            for c, row in levels.items():
                out.append(f"| {setup} | {c} | {row['rps']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
        s = r["summary"]
        if "haproxy" in s:
            cold = _cold(r)
            out += ["", "| ingress | model req/s, c=32 | p99 ms, c=32 | model / bare uvicorn | model / no-op | p99 ms, c=128 "
                    "(errors) |" + (" p99 ms, c=128, 124 connections opened inside |" if cold else "")
                    + " CPU ms a request: model replica / no-op replica / ingress |", "|---|---|---|---|---|---|---|" + ("---|" if cold else "")]
            for ingress in ("default proxy", "haproxy"):
                x = s[ingress]
                cpu_m, cpu_n = x["cpu_ms_per_request"]["model, batching on"], x["cpu_ms_per_request"]["no-op Serve, batching on"]
                ing = "haproxy" if ingress == "haproxy" else "proxy"
                out.append(f"| {ingress} | {x['model_rps_c32']:,.0f} | {x['model_p99_c32']:.0f} | {x['model_over_bare_c32']:.2f}x | "
                           f"{x['model_over_noop_c32']:.2f}x | {x['model_p99_c128']:.0f} ({x['model_errors_c128']}) | "
                           + (f"{x['model_p99_c128_cold']:.0f} | " if cold else "")
                           + f"{cpu_m.get('model replica', 0):.2f} / {cpu_n.get('no-op replica', 0):.2f} / {cpu_m.get(ing, 0):.2f} |")
            out += ["", f"HAProxy serves the model at **{s['haproxy_over_default_c32']:.2f}x** the default proxy's requests/s at "
                    "concurrency 32.", ""]

        def draw(ax: Any, rows: dict = r["rows"]) -> None:
            for setup, levels in rows.items():
                cs = sorted(levels, key=int)
                ax.plot([int(c) for c in cs], [levels[c]["p99_ms"] for c in cs], marker="o", label=f"{setup} p99")
            ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency ms", title="Serve latency")
            ax.legend(fontsize=6)
        name = _plot(folder / "serve_latency.png", draw)
        if name:
            out += [f"![latency against concurrency]({rel}/{name})", ""]
    return out


def by_user_id(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "serve_by_user_id.json"):
        out += ["### Recommend by user id", "", _source(r), "",
                f"HAProxy ingress, one replica; {r['users']:,} users of {r['clicks']} clicks each, the same histories "
                f"sent with every request or stored (Redis: a real redis-server on loopback, password and "
                f"`appendfsync always` on; memory: the replica's own store). Medians over {r['rounds']} rounds of "
                f"{r['requests_per_level']:,} requests a level, the setups alternating level by level.", "",
                "| setup | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for setup, levels in r["rows"].items():
            for c, row in levels.items():
                out.append(f"| {setup} | {c} | {row['rps']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
        out += ["", "| by user id | req/s / with the history, c=32 | p99 / with the history, c=32 |", "|---|---|---|"]
        for setup, x in r["summary"].items():
            out.append(f"| {setup} | **{x['rps_ratio_c32']:.2f}x** | **{x['p99_ratio_c32']:.2f}x** |")
        out += ["", "Target: at least 0.8x the requests/s and at most 1.25x the p99 of recommending with the history.", ""]
    return out


def replica_kills(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "serve_kill.json"):
        out += ["### A replica killed under load", "", _source(r), "",
                f"Two replicas behind HAProxy, 8 clients (4 of each kind) posting `/v1/recommend` in a loop; one replica "
                f"SIGKILLed every {r['every_s']:g} s, {r['kills']} times. Failed: any answer but 200 after the client's own resends.", "",
                "| client | requests | failed | failed answers |", "|---|---|---|---|"]
        for kind, c in r["clients"].items():
            bad = ", ".join(f"{o}: {n}" for o, n in sorted(c["outcomes"].items()) if o != "200") or "none"
            out.append(f"| {kind} | {c['requests']:,} | {c['failed']} | {bad} |")
        errors = ", ".join(f"{k}: {n}" for k, n in sorted(r["ingress_errors"].items())) or "none"
        out += ["", f"HAProxy's own error answers, by status and termination state (its log): {errors}.", ""]
    return out


def serve_start(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "serve_start.json"):
        out += [_source(r), "", f"`ray-rec serve`'s start path in a fresh process, idle cores or {r['busy']} busy-loop processes; "
                "seconds to the first answered request.", "",
                "| cores | Serve workers at | answered / starts | median seconds (answered) | failures |", "|---|---|---|---|---|"]
        for row in r["summary"]:
            errors = "; ".join(f"{len(t)}x {msg} (after {min(t):.0f}-{max(t):.0f} s)" for msg, t in row["failures"].items())
            med = f"{row['median_s']:.1f}" if row["median_s"] is not None else "-"
            out.append(f"| {row['load']} | {row['workers']} | {row['answered']} / {row['starts']} | {med} | {errors or '-'} |")
        out.append("")
    return out


def cluster(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "cluster.json"):
        jobs = r["job_seconds"]
        serve = r["serve"]
        out += [_source(r), "",
                f"A local multi-node cluster (`ray-rec local-cluster`: Ray's fake multi-node autoscaler, real raylets on one "
                f"machine), {r['users']} synthetic users on a loopback S3 server, {r['epochs']} epochs. Wall seconds of each "
                "`ray job submit`, from a cluster of the head alone; worker nodes start as the jobs ask.", "",
                "| prepare | train (2 workers, 2 nodes) | evaluate | batch-score | submit -> first node | last job -> head alone |",
                "|---|---|---|---|---|---|",
                f"| {jobs['prepare']} | {jobs['train']} | {jobs['evaluate']} | {jobs['batch_score']} | {r['first_node_s']} | "
                f"{r['back_to_head_s']} |", "",
                f"Node loss: a training node killed ({r['node_loss']['killed_processes']} processes) after the first checkpoint; "
                f"the run resumed on a replacement node {r['node_loss']['recovery_s']} s after the kill (the autoscaler notices "
                f"the dead node, starts another, Ray Train restarts the workers from the S3 checkpoint) and took "
                f"{r['node_loss']['run_seconds']} s in all; best validation NDCG@10 {r['best_val']['node_lost']:.4f} against "
                f"{r['best_val']['unfaulted']:.4f} without the fault.", "",
                f"Serve autoscaling (1 to 3 replicas of 2 CPUs each, one per CPU node): {serve['most_replicas']} replicas "
                f"{serve['scale_up_s']} s after the load began, one again {serve['scale_down_s']} s after it ended; "
                f"{serve['failed']} of {serve['requests']} requests failed.", ""]
    return out


def topk(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "topk_scale.json"):
        out += [_source(r), "", "| catalog | recommend() 1 user ms | recommend() 32 users ms | HTTP c=1 p50 / p99 ms | HTTP c=8 req/s | HTTP c=8 p99 ms |",
                "|---|---|---|---|---|---|"]
        for items, row in sorted(r["rows"].items(), key=lambda kv: int(kv[0])):
            p, h1, h8 = row["python"], row["http_c1"], row["http_c8"]
            out.append(f"| {int(items):,} | {p['batch1_ms']:.1f} | {p['batch32_ms']:.1f} | {h1['p50_ms']:.1f} / {h1['p99_ms']:.1f} | "
                       f"{h8['rps']:,.0f} | {h8['p99_ms']:.1f} |")
        out.append("")
    return out


def recommend_many(folder: Path) -> list[str]:
    out: list[str] = []
    for name, call, batches, what in (
        ("recommend_many.json", "`recommend()`", "in one call", "top-10 items"),
        ("evaluate_many.json", "Full-ranking evaluation", "in batches of 512, with 100 sampled negatives", "full-ranking metrics"),
    ):
        for r in _load(folder, name):
            s = r["summary"]
            out += [_source(r), "", f"{call} for {r['users']:,} users {batches}, {r['items']:,} items; "
                    "each mode in a fresh process, median seconds and the largest peak RSS over the rounds.", "",
                    "| mode | seconds | peak RSS MB |", "|---|---|---|"]
            out += [f"| {mode} | {s[mode]['median_s']:.2f} | {s[mode]['peak_rss_mb']:,.0f} |" for mode in ("blocks", "one block")]
            out += ["", f"Blocks: {s['one block']['median_s'] / s['blocks']['median_s']:.2f}x faster; "
                    f"same {what}: {r['same_result']}.", ""]
    return out


def gpu(folder: Path) -> list[str]:
    """The GPU check (`bench/gpu_check.sh`): each device's row, GPU figures as ratios of the CPU's."""
    path = folder / "gpu_check.json"
    if not path.exists():
        return []
    runs = json.loads(path.read_text())
    cpu, cuda = runs.get("cpu"), runs.get("cuda")
    out = ["Every figure names its device; ratios are GPU over CPU, each measured by the same command on its own machine."
           + ("" if cuda else " **No GPU has run this check yet**: the CPU row is the baseline the first GPU run is "
                              "compared with (its targets: training examples/s at least 10x the CPU's, the Ray Data "
                              "pipeline at least 3x the GPU's consumption)."), "",
           "| device | training fp32 | training bf16 | recommend, 1M items, 1 / 32 histories | Ray Data pipeline "
           "| `ray-rec train` (data wait) | Serve c=32 (p99) |", "|---|---|---|---|---|---|---|"]
    def cell(x: dict[str, Any] | None, base: dict[str, Any] | None, key: str = "examples_per_s") -> str:
        """A rate, with its ratio to ``base`` (the CPU's) on a GPU row; a skipped part says why."""
        if not x or key not in x:
            return str((x or {}).get("skipped", "-"))
        ratio = f" ({x[key] / base[key]:.1f}x)" if base and key in base and base is not x else ""
        return f"{x[key]:,.0f}/s{ratio}"

    for r in (cpu, cuda):
        if not r:
            continue
        base = cpu if r is cuda else None
        part = {k: r.get(k) or {} for k in ("speed", "recommend", "pipeline", "ray_train", "serve")}
        ref = {k: (base or {}).get(k) or {} for k in part}
        rec, rt, sv = part["recommend"], part["ray_train"], part["serve"]
        recommend = f"{rec['1_histories_ms']:.1f} / {rec['32_histories_ms']:.1f} ms" if "1_histories_ms" in rec else "-"
        serve = f"{sv['rps']:,.0f} req/s ({sv['p99_ms']:.0f} ms, {sv['errors']} errors)" if "rps" in sv else sv.get("skipped", "-")
        train = cell(rt, ref["ray_train"]) + (f" ({rt['data_wait_share']:.0%})" if "data_wait_share" in rt else "")
        out.append(f"| {r['device']}, {r['machine']} | {cell(part['speed'].get('fp32'), ref['speed'].get('fp32'))} | "
                   f"{cell(part['speed'].get('bf16'), ref['speed'].get('bf16'))} | {recommend} | "
                   f"{cell(part['pipeline'], ref['pipeline'])} | {train} | {serve} |")
    model = ((cpu or cuda or {}).get("speed") or {}).get("fp32", {}).get("model", "")
    out += ["", f"Training: the default model on Beauty ({model}), batch 128, dense item gradients, examples/s over the "
            "epochs after the first. `ray-rec train`: one worker, four epochs, no validation.", ""]
    q = (cuda or {}).get("quality")
    if q and "NDCG@10" in q:
        spread = q.get("cpu_seeds_NDCG@10") or []
        out += [f"Quality on {cuda['device']} (seed 0, `{q.get('cpu_row')}`): test NDCG@10 {q['NDCG@10']:.4f}, HR@10 "
                f"{q['HR@10']:.4f}, best epoch {q['best_epoch']}, {q['seconds']:.0f} s; the CPU seeds "
                + (f"{min(spread):.4f}-{max(spread):.4f}" if spread else "are not stored") + ".", ""]
    for r in (cpu, cuda):
        if r:
            out.append(_source(r))
    return out + [""]


def explanations(folder: Path) -> list[str]:
    """`bench.explain`: each attribution method's deletions against random and recent ones, and the cost."""
    out: list[str] = []
    for r in _load(folder, "explain_*.json"):
        f, sv = r["faithfulness"], r.get("serve", {})
        d, ms = f["deletions"], f["ms_per_query"]
        out += [f"### {r['dataset']}", "", _source(r) + f" Model: {r['model']}.", "",
                f"Faithfulness on {f['users']:,} test users (history without the held-out click, at least 4 clicks): the "
                "recommended item's rank (1 before) and score after deleting 3 of the clicks the model reads. *Wins*: the "
                "method's deletion drops the rank at least as far and the score further than both the random and the "
                "recent deletion; *rank wins*: the rank strictly further than both.", "",
                "| deleted clicks | mean rank drop | median rank drop | mean score drop | wins | rank wins | same 3 clicks as a baseline | wins where the clicks differ | ms per query, batches of 32 |",
                "|---|---|---|---|---|---|---|---|---|"]
        for name, row in d.items():
            label = {"random": "3 at random", "recent": "the 3 most recent"}.get(
                name, f"top 3 by `{name}`" if " " not in name else f"3 by {name} (not in the product)")
            extra = (f"{row['wins']:.0%} | {row['rank_wins']:.0%} | {row['same_clicks_as_a_baseline']:.0%} | "
                     f"{row.get('wins_where_the_clicks_differ', 0):.0%}" if "wins" in row else "- | - | - | -")
            cost = f"{ms[name]:.2f} (plain {ms['plain']:.2f})" if name in ms else "-"
            out.append(f"| {label} | {row['mean_rank_drop']:,.1f} | {row['median_rank_drop']:,.0f} | "
                       f"{row['mean_score_drop']:.3f} | {extra} | {cost} |")
        if "ceiling" in f:
            c = f["ceiling"]
            out += ["", f"Ceiling: some 3 clicks win on {c['some_set_wins']:.0%} of the users (every 3-click set of the "
                    f"{c['pool']} clicks with the largest leave-one-out contributions tried; exact for the "
                    f"{c['exact_users']:.0%} whose window holds at most {c['pool']} clicks, where it is "
                    f"{c['some_set_wins_where_exact']:.0%}): no choice of 3 clicks wins on more of those."]
        if sv:
            out += ["", f"Serve, `/v1/recommend` (k=10, the default method, `{r.get('method', 'leave_one_out')}`), medians over the rounds:", "",
                    "| history | concurrency | plain req/s | plain p50 / p99 ms | explain req/s | explain p50 / p99 ms | p50 ratio | errors |",
                    "|---|---|---|---|---|---|---|---|"]
            for one in sv if isinstance(sv, list) else [sv]:  # older reports measured one history
                for c in (1, 32):
                    p, e = one[f"c{c}_plain"], one[f"c{c}_explain"]
                    out.append(f"| {one['history_length']} clicks | {c} | {p['rps']:,.0f} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} | "
                               f"{e['rps']:,.0f} | {e['p50_ms']:.1f} / {e['p99_ms']:.1f} | {one[f'c{c}_p50_ratio']:.2f}x | "
                               f"{p['errors'] + e['errors']} |")
        out.append("")
    return out


def write_report(folder: Path, target: Path, quick: bool = False) -> Path:
    rel = str(folder.relative_to(target.parent)) if folder.is_relative_to(target.parent) else str(folder)
    lines = ["# Benchmarks" + (" (quick sizes: not the reference figures)" if quick else ""), "",
             "Generated by `python -m bench" + (" --quick" if quick else "") + "` from the JSON under "
             f"`{rel}/`; each section names the command and machine that produced it. Rerun a section with its command, "
             "then `python -m bench --report`.", ""]
    if not quick:
        from bench.__main__ import quality_runs

        runs, seconds = quality_runs(folder)
        lines += [f"`python -m bench` retrains every stored quality row with the seeds and schedule it shows: {runs} training "
                  f"runs, {seconds / 3600:.1f} hours of training as their rows record it (`python -m bench --jobs 2` runs two "
                  f"side by side, about {round(seconds / 7200)} hours on a 2-core machine), then the timing benchmarks one at a "
                  "time.", ""]
    from bench.next_click import section as next_click

    sections = [("Model quality (leave-one-out, full ranking, seen items excluded; test split)", quality(folder, rel)),
                ("The product as a user runs it, on the next click", next_click(folder)),
                ("Training speed", speed(folder) + shared_cores(folder) + loss_memory(folder) + sparse_items(folder) + ray_runs(folder)
                 + relevance_cost(folder) + enhancer_cost(folder)), ("Data: import and streaming at scale", data(folder)),
                ("Serving", serving(folder, rel) + serve_start(folder) + by_user_id(folder) + replica_kills(folder)), ("Top-k latency against catalog size", topk(folder) + recommend_many(folder)),
                ("Explanations", explanations(folder)), ("On a cluster", cluster(folder)), ("On a GPU", gpu(folder))]
    for title, body in sections:
        lines += [f"## {title}", ""] + (body or ["Not measured yet: run its command.", ""])
    target.write_text("\n".join(lines))
    return target


# What each reliability record means: (the fault or input class, what the test does and checks, test name).
RELIABILITY = {
    "worker SIGKILL mid-epoch": (
        "Fault: a training worker is SIGKILLed in the middle of epoch 2 (2 workers, S3 output).",
        "Ray Train restarts the worker group; the workers resume from the newest checkpoint (the one Ray registered, or "
        "the newest complete one in storage if the worker died before Ray registered it). The run finishes its 3 epochs; "
        "metrics.jsonl shows `resumes` 0, 1, 1; the final validation NDCG@10 matches the same run without the fault "
        "within max(0.03, 15%).", "test_killed_worker_resumes_and_ends_like_a_clean_run"),
    "S3 endpoint down 6 s during training": (
        "Fault: the S3 server is stopped for 6 s right after the first checkpoint lands, then restarted.",
        "Checkpoint uploads, metric writes and data reads retry (10 attempts, standard backoff); every epoch's "
        "checkpoint and metrics row is there and the artifact loads.", "test_training_survives_an_s3_outage"),
    "S3 endpoint down 3 s during import": (
        "Fault: the S3 server stops for 3 s while `prepare` uploads its shards.", "The retries ride it out; the "
        "dataset is complete (its manifest counts match the shards).", "test_import_during_an_s3_outage_completes_or_leaves_nothing_complete"),
    "S3 endpoint down 40 s during import": (
        "Fault: the S3 server stops for 40 s during the upload.", "Either outcome is allowed: complete and consistent, "
        "or failed with no manifest.", "test_import_during_an_s3_outage_completes_or_leaves_nothing_complete"),
    "S3 endpoint down 20 s during import (2 attempts)": (
        "Fault: the S3 server stops for 20 s during the upload, with retries cut to 2 attempts (`RAY_REC_S3_RETRIES`).",
        "The import fails with an error naming the key; no manifest is written, so no half dataset looks complete.",
        "test_import_during_an_s3_outage_completes_or_leaves_nothing_complete"),
    "Serve replica SIGKILL while events arrive, 2 replicas on Redis (6 clients)": (
        "Fault: one of two replicas (user state in Redis) is SIGKILLed while 6 clients post one event at a time, "
        "each with its own timestamp, through `ray_rec.serve.client` (a reset connection or the ingress's own 500 is sent again).",
        "Every event answered 200 is in Redis afterwards (acknowledged means written).",
        "test_a_replica_killed_while_events_arrive_loses_no_acknowledged_event"),
    "redis-server SIGKILL and restart while events arrive (appendfsync always, 4 clients)": (
        "Fault: redis-server (append-only, fsync always) is SIGKILLed while 4 clients post events, and restarted 2 s later.",
        "While it is down a request by user id alone gets 503 at once and one with a history gets 200; after the "
        "restart every event answered 200 is there and requests by id are answered again.",
        "test_redis_killed_and_restarted_loses_nothing_acknowledged_and_answers_503_only_for_id_requests"),
    "Serve replica SIGKILL under load (8 clients)": (
        "Fault: the only replica process is SIGKILLed while 8 clients send requests through the HAProxy ingress "
        "(request timeout 10 s; clients use `ray_rec.serve.client`: a reset connection or the ingress's own 500 is sent again).",
        "Every request gets a response (200 or an error status), none waits past the timeout, Serve starts a new "
        "replica, then 50 requests in a row succeed.", "test_serve_replica_killed_under_load"),
    "Serve replica SIGKILL under load, 2 replicas (8 clients)": (
        "Fault: one of two replicas is SIGKILLed while 8 clients send requests through the HAProxy ingress (clients "
        "use `ray_rec.serve.client`: a reset connection or the ingress's own 500 is sent again).",
        "Every request succeeds: HAProxy sends new requests to the live replica; those the dead one took are sent "
        "again by the client.",
        "test_a_replica_killed_under_load_fails_no_request_while_another_serves"),
    "generated requests from the OpenAPI schema": (
        "Bad input: 10,000 requests generated with hypothesis from the app's own OpenAPI schema: valid, wrong-typed, "
        "out-of-range, extra fields, non-JSON bytes, bodies over the size limit, missing or wrong API key.",
        "No 5xx, no hang (client timeout 30 s).", "test_ten_thousand_generated_requests_get_no_5xx_and_no_hang"),
    "fuzzed event logs (CSV, Parquet)": (
        "Bad input: generated event logs: random column sets, wrong types, nulls, huge ids and timestamps, unicode, "
        "empty and truncated files.", "`ray-rec prepare` exits 0 with drops counted, or 2 with one `error:` line and no "
        "manifest; never a stack trace.", "test_fuzzed_event_files_get_a_clear_error_or_counted_drops"),
    "fuzzed mostly-valid event logs": (
        "Bad input: logs with every required column where any value may be bad (nulls, empty or huge ids, unicode, junk "
        "or out-of-range timestamps, unknown events).", "Imports when some user keeps 3 clicks, and then every row read "
        "is either kept or counted under a drop reason; otherwise a clear error.",
        "test_fuzzed_mostly_valid_logs_import_with_bad_rows_counted"),
    "fuzzed seqtxt and MovieLens files": (
        "Bad input: arbitrary lines in seqtxt, `u.data`, `ratings.dat` and `ratings.csv` files.", "As above.",
        "test_fuzzed_text_formats_get_a_clear_error_or_counted_drops"),
    "malicious pickles planted in artifacts and checkpoints": (
        "Attack: a pickle whose unpickling runs a shell command replaces the weights, sits beside them as `model.pt`, "
        "`weights.pt` and `pytorch_model.bin`, replaces each file of a checkpoint's trainer state, and stands in an "
        "old-layout checkpoint as `trainer_state.pt`.", "Weights and optimizer tensors load only as safetensors, the "
        "rest of the state only as JSON (a pickle is refused with a clear error); stray files and the old pickle are "
        "never read; the command never runs.", "test_malicious_pickles_in_artifacts_and_checkpoints_are_refused"),
    "secrets in logs and outputs": (
        "Leak check: after keyed Serve requests (right and wrong key) and training on S3, every Ray log file and every "
        "object the runs wrote (manifests, checkpoints, artifacts, metrics) is searched for the API keys, the S3 "
        "secret and the access key id.", "None found. (Credentials are never passed in a runtime_env: Ray's runtime-env "
        "agent logs it.)", "test_api_key_and_credentials_never_reach_logs_or_outputs"),
}


# The security review's attacks, each made for real by a test (tests/test_security.py unless named).
SECURITY = [
    ("A Parquet column of Ray's pickled-object extension type, whose values run a command when read, in an "
     "artifact's `items.parquet`, a data set's shards and vocabulary, an input log and an item-features file",
     "Every Parquet reader checks the file's schema first (footers for the Ray Data pipeline, the batch inside "
     "its tasks) and refuses extension types and unexpected column types, naming file and column; nothing is "
     "converted", "test_an_artifacts_items_file_with_an_extension_type_is_refused_unread, "
     "test_dataset_shards_with_an_extension_type_are_refused_by_every_reader, "
     "test_prepare_refuses_input_logs_and_item_files_with_an_extension_type"),
    ("Pickles planted in weights, beside them, in every trainer-state file and as an old `trainer_state.pt`",
     "Nothing is unpickled: safetensors and JSON only; `torch.load` is not called", "test_reliability.py::"
     "test_malicious_pickles_in_artifacts_and_checkpoints_are_refused"),
    ("A 300 KB body of 75,000 empty objects; a lone-surrogate id; an unknown field named with control characters",
     "Lists stop at 10,000 entries and ids at 512 characters while parsing; a 422 lists at most 10 problems, "
     "escaped, never the input (under 2 KB)", "test_a_bad_request_gets_a_small_answer_that_echoes_nothing, "
     "test_serve.py::test_hostile_bodies_get_small_clear_answers"),
    ("A reload to a config that asks for ~12 GB, to weights that do not match it, to a version that is not the "
     "weights' hash, to NaN weights; an S3 prefix with a large stray file",
     "Size checked against `max_model_mb` on a meta-device model before anything is allocated; shapes, hash and "
     "finiteness checked, one trial prediction, then the swap; only the artifact's own files are fetched",
     "test_an_artifact_is_checked_before_anything_is_allocated, "
     "test_an_s3_artifact_downloads_only_its_own_files_within_the_budget, "
     "test_serve_reload.py::test_reload_swaps_the_version_without_failed_requests_and_rejects_bad_artifacts"),
    ("`batch-score --output` at the run folder holding the model, a bucket root, `.`; `prepare --output` at a "
     "folder of someone else's files", "Outputs carry a marker; other files need `--overwrite`; roots, the working "
     "directory and folders holding what the command reads are refused always", "test_outputs_never_replace_what_"
     "the_command_did_not_write, test_batch_score_into_the_run_folder_deletes_nothing, "
     "test_prepare_into_a_folder_of_someone_elses_files_is_refused"),
    ("Install-time code from the public index; the API key or AWS keys in a runtime_env or a pickled filesystem; "
     "the cluster token printed; SSH from 0.0.0.0/0", "Serve configs install nothing and hold no secret; the "
     "S3 filesystem carries no keys; the token is mounted, never printed; every node uses the user's security group",
     "test_serve_configs_install_nothing_and_hold_no_secret, test_the_s3_filesystem_carries_no_credentials_when_"
     "pickled, test_cluster.py"),
    ("`/docs`, `/redoc`, `/openapi.json` without the key; a key with a trailing newline; serving on 0.0.0.0 "
     "without a key", "All need the key; the key is stripped; a warning", "test_serve.py::test_api_key_is_required_"
     "except_for_health, test_the_api_key_is_stripped_and_a_blank_one_refused, "
     "test_serving_beyond_loopback_without_a_key_is_warned_about"),
    ("KubeRay pods as root with a writable root and no network policy", "Non-root, read-only root, no privilege "
     "escalation, no capabilities, KubeRay's NetworkPolicy, token auth; validated against the CRD schemas",
     "test_cluster.py::test_kuberay_clusters_use_token_auth_a_network_policy_and_locked_down_pods"),
    ("A 1 GiB gzip of zeros (one endless line) as seqtxt, MovieLens and CSV input; a folder with two link loops",
     "Refused once a line passes 64 MiB (peak memory under 1 GB, was over 3 GB); links to folders are not followed",
     "test_a_gzip_bomb_is_refused_with_bounded_memory, test_a_link_loop_in_an_input_folder_is_not_followed"),
]


def write_reliability(results: Path, target: Path) -> Path:
    data = json.loads((results / "reliability.json").read_text()) if (results / "reliability.json").exists() else {}
    lines = ["# Reliability", "",
             "What ray_rec does when things go wrong, each class shown by a test in `tests/test_reliability.py` or "
             "`tests/test_user_state.py` that "
             "injects the fault for real (a real SIGKILL, a real S3-protocol server stopped and restarted, real HTTP "
             "against Ray Serve, a real redis-server killed and restarted). Figures are from the last run of those tests by `python -m bench.reliability` (a plain `make test` "
             "records nothing), read from `bench/results/reliability.json`; `python -m bench --report` rewrites this file.", "",
             "| class | what happens | what is checked | figures (last run) |", "|---|---|---|---|"]
    for name, (what, checked, test) in RELIABILITY.items():
        fig = data.get(name)
        shown = ", ".join(f"{k} {v}" for k, v in fig.items() if k != "recorded") + f" ({fig['recorded']})" if fig else "not run"
        lines.append(f"| {name} | {what} | {checked} `{test}` | {shown} |")
    lines += ["", "## Security", "", "Each attack of the security review, made for real by a test that passes in `make test`.", "",
              "| attack | what stops it | test |", "|---|---|---|"]
    lines += [f"| {attack} | {defence} | `{test}` |" for attack, defence, test in SECURITY]
    lines += ["", "## Security settings these rest on", "",
              "- Artifacts: weights as safetensors, config and vocabulary as JSON/Parquet; checkpoints add the optimizer "
              "state as safetensors and JSON. Nothing is unpickled; every Parquet schema is checked before a value is read.",
              "- Serve: with `api_key_env` set, every endpoint but `/healthz` needs `X-API-Key`, compared with "
              "`hmac.compare_digest` (constant time; `ray_rec/serve/http.py`); the key is never logged; bodies over "
              "`max_body_bytes` get 413; requests wait at most `request_timeout_s` (30 s in `serve_configs/`).",
              "- Ray token authentication stays on (Ray 2.60's default); no config in `serve_configs/`, `cluster.yaml` "
              "or `deploy/` turns it off (`tests/test_cluster.py`).",
              "- S3 credentials come from the standard AWS chain on each node; ray_rec never writes them to logs, "
              "manifests, checkpoints or artifacts, and never ships them in a runtime_env.", ""]
    target.write_text("\n".join(lines))
    return target

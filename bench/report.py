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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def quality(folder: Path, rel: str) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "model_quality_*.json"):
        ds = r["dataset"]
        out += [f"### {ds}", "", _source(r), "",
                "| model | " + " | ".join(KEYS) + " | best epoch | seconds |", "|---" * (len(KEYS) + 3) + "|"]
        for name, row in r["rows"].items():
            out.append(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in KEYS) + f" | {row['best_epoch'] or '-'} | {row['seconds'] or '-'} |")
        for name, row in r.get("published", {}).items():
            out.append(f"| {name} (published) | " + " | ".join(f"{row[k]:.4f}" if k in row else "-" for k in KEYS) + " | - | - |")
        rows = r["rows"]
        if "default" in rows and "sasrec" in rows:
            out += ["", f"Default / SASRec-shaped NDCG@10: **{rows['default']['NDCG@10'] / rows['sasrec']['NDCG@10']:.3f}x**."]
        curves = {n: row["history"] for n, row in rows.items() if row.get("history")}
        if curves:
            def draw(ax: Any, curves: dict = curves, ds: str = ds) -> None:
                for name, hist in curves.items():
                    pts = [(h["epoch"], h["val_NDCG@10"]) for h in hist if "val_NDCG@10" in h]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
                ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=f"{ds}: training curves")
                ax.legend(fontsize=7)
            name = _plot(folder / f"quality_{ds}.png", draw)
            if name:
                out += ["", f"![training curves]({rel}/{name})"]
        out.append("")
    return out


def speed(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "train_speed_*.json"):
        plain = r["plain_examples_per_s"]
        out += [f"### {r['dataset']}", "", _source(r), "", "| loop | examples/s | vs plain | fixed start-up s |", "|---|---|---|---|",
                f"| plain PyTorch, 1 process | {plain:,.0f} | 1.00x | - |"]
        for label, key in (("Ray Train, 1 worker", "ray_1_worker"), ("Ray Train, 2 workers", "ray_2_workers")):
            row = r[key]
            out.append(f"| {label} | {row['examples_per_s']:,.0f} | {row['examples_per_s'] / plain:.2f}x | {row['fixed_s']:.1f} |")
        out.append("")
    return out


def data(folder: Path) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "data_scale.json"):
        out += [_source(r), "", "| events | import s | import events/s | import peak RSS MB | stream examples/s (S3 -> tensors) | stream peak MB (processes) | stream object-store pages MB |",
                "|---|---|---|---|---|---|---|"]
        for size, row in sorted(r["sizes"].items(), key=lambda kv: int(kv[0])):
            imp, st = row["import"], row["stream"]
            out.append(f"| {int(size):,} | {imp['seconds']:.0f} | {imp['events_per_s']:,.0f} | {imp['peak_rss_mb']:,.0f} | "
                       f"{st['examples_per_s']:,.0f} | {st['peak_pss_mb']:,.0f} | {st.get('peak_object_store_pages_mb', 0):,.0f} |")
        t = r["train_step"]
        out += ["", f"Default model training step rate on the largest set ({t['catalog']:,} items, one process): "
                f"{t['examples_per_s']:,.0f} examples/s; pipeline / training = **{r['pipeline_over_training']:.1f}x**. "
                f"Peak memory, largest vs second-largest size: import {r['import_peak_growth']:.2f}x, stream "
                f"{r['stream_peak_growth']:.2f}x.", ""]
    return out


def serving(folder: Path, rel: str) -> list[str]:
    out: list[str] = []
    for r in _load(folder, "serve_load.json"):
        out += [_source(r), "", "| setup | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
        for setup, levels in r["rows"].items():
            for c, row in levels.items():
                out.append(f"| {setup} | {c} | {row['rps']:,.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['errors']} |")
        s = r["summary"]
        out += ["", f"At concurrency 32 the model serves {s['rps_ratio_c32']:.2f}x the no-op Serve app's requests/s with "
                f"{s['p99_ratio_c32']:.2f}x its p99; batching gains {s['batching_gain_c128']:.1f}x at concurrency 128.", ""]

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


def write_report(folder: Path, target: Path, quick: bool = False) -> Path:
    rel = str(folder.relative_to(target.parent)) if folder.is_relative_to(target.parent) else str(folder)
    lines = ["# Benchmarks" + (" (quick sizes: not the reference figures)" if quick else ""), "",
             "Generated by `python -m bench" + (" --quick" if quick else "") + "` from the JSON under "
             f"`{rel}/`; each section names the command and machine that produced it. Rerun a section with its command, "
             "then `python -m bench --report`.", ""]
    sections = [("Model quality (leave-one-out, full ranking, seen items excluded; test split)", quality(folder, rel)),
                ("Training speed", speed(folder)), ("Data: import and streaming at scale", data(folder)),
                ("Serving", serving(folder, rel)), ("Top-k latency against catalog size", topk(folder))]
    for title, body in sections:
        lines += [f"## {title}", ""] + (body or ["Not measured yet: run its command.", ""])
    target.write_text("\n".join(lines))
    return target

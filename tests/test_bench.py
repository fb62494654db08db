"""Benchmark bookkeeping: how seeds combine into a quality row and how the report shows it."""

from __future__ import annotations

import pytest

from bench.model_quality import KEYS, MODEL_REVISION, add_seed, row_name
from bench.report import curve, quality_table


def result(ndcg: float, epoch: int) -> dict:
    return {**{k: ndcg for k in KEYS}, "best_epoch": epoch, "seconds": 100 * epoch,
            "history": [{"epoch": 1, "val_NDCG@10": ndcg / 2}]}


def test_seeds_average_into_one_row_and_an_old_row_counts_as_seed_0():
    old = {**{k: 0.04 for k in KEYS}, "best_epoch": 30, "seconds": 900, "history": [{"epoch": 1, "val_NDCG@10": 0.01}],
           "model_revision": MODEL_REVISION}
    row = add_seed(old, 1, result(0.05, 20), {"model.enhancer": "augru"}, "python -m bench.model_quality --variants x")
    assert row["seeds"] == [0, 1]
    assert row["NDCG@10"] == pytest.approx(0.045)
    assert row["NDCG@10_std"] == pytest.approx(0.00707, abs=1e-5)
    assert row["best_epochs"] == [30, 20]
    assert curve(row) == old["history"] and "history" not in row  # the curve shown stays seed 0's, kept once
    assert row["command"].endswith("--seeds 0 1")
    again = add_seed(row, 1, result(0.06, 25), {}, "cmd")  # rerunning a seed replaces it
    assert again["seeds"] == [0, 1] and again["NDCG@10"] == pytest.approx(0.05)


def test_rows_trained_by_older_model_code_are_marked_and_never_mixed_with_new_seeds():
    old = {**add_seed(None, 0, result(0.04, 30), {}, "c"), "model_revision": MODEL_REVISION - 1}
    rows = {"default": old, "sasrec": add_seed(None, 0, result(0.05, 20), {}, "c")}
    table = "\n".join(quality_table({"rows": rows}))
    assert "| default† | " in table and "| sasrec | " in table
    assert "Default / SASRec-shaped" not in table  # no ratio between rows of different model code
    assert "† Trained by the model code" in table
    again = add_seed(old, 1, result(0.06, 25), {}, "c")  # a seed of the current code starts the row over
    assert again["seeds"] == [1] and again["NDCG@10"] == pytest.approx(0.06) and again["model_revision"] == MODEL_REVISION


def test_the_quality_table_shows_the_spread_of_seeded_rows():
    rows = {"default": add_seed(add_seed(None, 0, result(0.05, 20), {}, "c"), 1, result(0.052, 22), {}, "c"),
            "sasrec": add_seed(None, 0, result(0.048, 40), {}, "c")}
    table = "\n".join(quality_table({"rows": rows}))
    assert "| default | " in table and "0.0510 ± 0.0014 | " in table and "| 2 | 20, 22 |" in table
    assert "| sasrec | " in table and "±" not in table.split("| sasrec |")[1].splitlines()[0]
    assert "1.062x" in table


def test_another_schedule_gets_its_own_rows_and_ratio():
    assert row_name("default", 60, 6) == "default"
    long = row_name("default", 200, 10)
    assert long == "default (200 epochs, patience 10)"
    assert row_name("relevance=mlp", 60, 2, eval_every=3) == "relevance=mlp (60 epochs, validated every 3 epochs, patience 2)"
    assert row_name("default", 60, 6, sets=["model.loss=bce"]) == "default with model.loss=bce"  # never the default's row
    assert row_name("default", 200, 10, sets=["a=1", "b=2"]) == "default (200 epochs, patience 10) with a=1, b=2"
    rows = {"default": add_seed(None, 0, result(0.05, 20), {}, "c"), "sasrec": add_seed(None, 0, result(0.04, 20), {}, "c"),
            long: add_seed(None, 0, result(0.051, 40), {}, "c"), row_name("sasrec", 200, 10): add_seed(None, 0, result(0.05, 50), {}, "c")}
    table = "\n".join(quality_table({"rows": rows}))
    assert "NDCG@10: **1.250x**" in table
    assert "NDCG@10 (200 epochs, patience 10): **1.020x**" in table


def test_the_full_suite_remakes_every_stored_figure_with_its_own_command():
    """`python -m bench` runs each stored benchmark's command, and trains every stored quality row
    of both data sets with the seeds and schedule it shows, into that row, never a new one."""
    import json
    from pathlib import Path

    from bench.__main__ import FULL
    from bench.model_quality import parse_args

    results = Path(__file__).parents[1] / "bench" / "results"
    commands = {" ".join(["python -m", *cmd]) for cmds in FULL.values() for cmd in cmds}
    for path in results.glob("*.json"):
        stored = json.loads(path.read_text())
        if path.name.startswith("next_click_"):  # a command per row, with its seeds
            assert all(row["command"] in commands for row in stored["rows"].values()), path.name
        if path.name.startswith(("model_quality_", "next_click_")) or "command" not in stored:
            continue
        assert stored["command"].split(" (")[0] in commands, path.name

    made: dict[tuple[str, str], set[int]] = {}
    for cmd in FULL["quality"]:
        args = parse_args(cmd[1:])
        for v in args.variants:
            made.setdefault((args.dataset, row_name(v, args.epochs, args.patience, args.eval_every, args.set)), set()).update(args.seeds)
    for dataset in ("Beauty", "Sports_and_Outdoors"):
        rows = json.loads((results / f"model_quality_{dataset}.json").read_text())["rows"]
        for row, stored in rows.items():
            if row != "popularity":
                assert set(stored["seeds"]) == made.get((dataset, row)), (dataset, row)
                # and the command the row names makes that row, with those seeds
                own = parse_args(stored["command"].split()[3:])
                assert row in {row_name(v, own.epochs, own.patience, own.eval_every, own.set) for v in own.variants}, row
                assert own.dataset == dataset and own.seeds == stored["seeds"], (dataset, row)
    assert ("Beauty", "relevance=mlp (60 epochs, validated every 3 epochs, patience 2)") in made
    assert ("Sports_and_Outdoors", "relevance=mlp (60 epochs, validated every 3 epochs, patience 2)") in made


def test_rows_written_side_by_side_are_all_kept(tmp_path):
    """Quality runs started side by side on one data set each write the report after every seed;
    each write re-reads the stored rows under a lock, so no run drops another's rows."""
    import multiprocessing

    out = tmp_path / "model_quality_X.json"
    ctx = multiprocessing.get_context("spawn")
    writers = [ctx.Process(target=write_rows, args=(out, name)) for name in ("a", "b", "c")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0, 0, 0]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {f"{name}{i}" for name in "abc" for i in range(30)}
    assert rows["b7"]["NDCG@10"] == pytest.approx(0.07)


def write_rows(out, name: str) -> None:
    from bench.model_quality import update_report

    for i in range(30):
        update_report(out, "X", f"{name}{i}", lambda old, i=i: add_seed(old, 0, result(i / 100, 1), {}, "c"))


def test_a_result_is_written_whole_or_not_at_all(tmp_path):
    """A report that fails to serialise leaves the earlier result as it was, and no temporary file."""
    import json

    from bench.output import write_json

    out = tmp_path / "new folder" / "r.json"
    write_json(out, {"rows": [1, 2]})
    with pytest.raises(TypeError):
        write_json(out, {"rows": [object()]})
    assert json.loads(out.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_the_enhancer_cost_benchmark_times_every_enhancer_and_reports_it(tmp_path):
    """`bench.enhancer_cost` on a small generated log: every enhancer timed on the same batches,
    ratios against `none`, and the report's table shows every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.enhancer_cost import ENHANCERS, run_shape
    from bench.report import enhancer_cost_table
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.data.synthetic import bulk_log

    src, data = tmp_path / "events.parquet", tmp_path / "ds"
    pq.write_table(pa.concat_tables(bulk_log(20_000, items=300, mean_clicks=60, seed=0)), src)
    prepare(PrepareOptions(input=str(src), output=str(data), num_shards=1))
    shape = run_shape("small", str(data), steps=2, rounds=2, max_len=200)  # as the benchmark runs long histories
    assert (shape["history_len"], shape["dropout"]) == (200, 0.2)  # users average over 40 clicks: long
    assert set(shape["rows"]) == set(ENHANCERS)
    none = shape["rows"]["none"]["runs"]
    for row in shape["rows"].values():
        assert len(row["runs"]) == 2 and all(v > 0 for run in row["runs"] for v in run.values())
        within = [a["step_ms"] / b["step_ms"] for a, b in zip(row["runs"], none)]  # per round
        assert row["ratio_to_none"]["step_ms"] == pytest.approx(sum(within) / 2)  # their median
    table = [line for line in enhancer_cost_table({"shapes": {"small": shape}}) if line.startswith("| small | 200 |")]
    assert [line.split(" | ")[2] for line in table] == list(ENHANCERS)


def test_the_full_training_report_says_how_each_runs_learning_rate_moved(tmp_path):
    """Full training rows trained under different schedules sit in one table: each says its batch
    (a step's and each worker's, where the run recorded it) and whether
    its rate was constant (or not recorded, from before training could halve it) or when it halved."""
    import json

    from bench.report import ray_runs

    def run(rates: list[float | None]) -> dict:
        history = [{"epoch": i + 1, **({"lr": lr} if lr is not None else {})} for i, lr in enumerate(rates)]
        test = {k: {"HR@10": 0.08, "NDCG@10": 0.05} for k in ("full_ranking", "popularity_full_ranking", "sampled_100")}
        return {"wall_s": 10.0, "epochs": len(rates), "best_epoch": 1, "examples_per_s": 1.0, "test": test, "history": history}

    runs = {"1": run([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4]), "2": run([None, None]), "3": run([1e-3, 1e-3])}
    runs["3"]["batch"] = {"step": 129, "worker": 43}
    (tmp_path / "ray_train_X.json").write_text(json.dumps({"dataset": "X", "runs": runs}))
    rows = {line.split(" | ")[0]: line.split(" | ")[1:3] for line in ray_runs(tmp_path) if line[2:3].isdigit()}
    assert rows == {"| 1": ["not recorded", "halved 2x (after epochs 3, 5)"],
                    "| 2": ["not recorded", "constant (not recorded)"], "| 3": ["129 (43)", "constant"]}


def test_next_click_scores_the_held_out_click_after_the_whole_history(tmp_path):
    """`bench.next_click` ranks each user's held-out click after every click the data set holds;
    a click on an item the data set never saw counts as a miss, and the plain SASRec trains."""
    import torch

    from bench.next_click import PlainSASRec, next_click_metrics
    from ray_rec.config import load_config
    from ray_rec.data.prepare import PrepareOptions, prepare
    from ray_rec.train.local import train_local

    g = torch.Generator().manual_seed(0)
    lines = [" ".join(str(int(i)) for i in [u, *torch.randperm(40, generator=g)[:12] + 1]) for u in range(1, 31)]
    (tmp_path / "seq.txt").write_text("\n".join(lines) + "\n")
    data = str(tmp_path / "data")
    prepare(PrepareOptions(input=str(tmp_path / "seq.txt"), output=data, format="seqtxt", num_shards=1))
    model = train_local(data, load_config(None, {"model.dim": 8, "train.epochs": 1}), log=lambda _: None).model
    seen = {line.split()[0]: line.split()[1:] for line in lines}
    unseen = {u: "no-such-item" for u in seen}
    assert next_click_metrics(model, data, unseen) == {"HR@10": 0.0, "HR@20": 0.0, "NDCG@10": 0.0, "NDCG@20": 0.0}
    fresh = {u: next(str(i) for i in range(1, 41) if str(i) not in items) for u, items in seen.items()}
    metrics = next_click_metrics(model, data, fresh)
    assert 0 < metrics["HR@20"] <= 1 and metrics["NDCG@10"] <= metrics["HR@10"]
    split_model, final, summary = PlainSASRec(data, 0, lambda _: None).fit(patience=1, epochs=2)
    assert 1 <= summary["best_epoch"] <= 2 and set(summary["split"]) == {"HR@10", "HR@20", "NDCG@10", "NDCG@20"}
    assert not torch.equal(split_model.features.item.weight, final.features.item.weight)


def test_reliability_records_go_only_where_the_benchmark_asks(tmp_path, monkeypatch):
    """A plain test run writes no tracked file: a reliability test's figures are written only to
    the file `python -m bench.reliability` names, one JSON line each."""
    import json

    from bench.reliability import RECORDS_ENV

    from .test_reliability import record

    monkeypatch.delenv(RECORDS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    record("nothing asked", faults=1)
    assert list(tmp_path.iterdir()) == []
    target = tmp_path / "records.jsonl"
    monkeypatch.setenv(RECORDS_ENV, str(target))
    record("a fault", faults=1, survived=1)
    record("another", leaks=0)
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [(r["name"], r.get("faults"), r.get("leaks")) for r in rows] == [("a fault", 1, None), ("another", None, 0)]


def test_the_gpu_check_runs_its_model_parts_and_reports_against_the_cpu(tmp_path, capsys):
    """`python -m bench.gpu_check` (its parts without Ray, on the CPU, quick sizes) measures every
    part; the report puts a GPU run beside the CPU baseline as ratios, and says when none ran."""
    import json

    from bench.gpu_check import main
    from bench.report import gpu

    main(["--device", "cpu", "--quick", "--parts", "speed", "quality", "recommend"])
    printed = capsys.readouterr().out
    run = json.loads(printed[printed.index("\n{") + 1:])
    assert run["device"] == "cpu" and run["speed"]["fp32"]["examples_per_s"] > 0 and run["speed"]["bf16"]["examples_per_s"] > 0
    assert 0 <= run["quality"]["NDCG@10"] <= 1 and run["recommend"]["32_histories_ms"] > 0
    assert run["command"].endswith("--quick --parts speed quality recommend")

    cpu = {**run, "machine": "x86_64, 2 cores", "pipeline": {"examples_per_s": 1000.0},
           "ray_train": {"examples_per_s": 100.0, "data_wait_share": 0.01}, "serve": {"rps": 500.0, "p99_ms": 40.0, "errors": 0}}
    (tmp_path / "gpu_check.json").write_text(json.dumps({"cpu": cpu}))
    assert "No GPU has run this check yet" in "\n".join(gpu(tmp_path))
    cuda = {**cpu, "device": "cuda:0 (NVIDIA H100 80GB HBM3)", "ray_train": {"examples_per_s": 2500.0, "data_wait_share": 0.2},
            "pipeline": {"skipped": "Ray is not installed here"}, "serve": {"skipped": "Ray is not installed here"},
            "quality": {**run["quality"], "cpu_seeds_NDCG@10": [0.05, 0.06], "cpu_row": "default"}}
    (tmp_path / "gpu_check.json").write_text(json.dumps({"cpu": cpu, "cuda": cuda}))
    text = "\n".join(gpu(tmp_path))
    gpu_row = next(line for line in text.splitlines() if line.startswith("| cuda:0 (NVIDIA H100"))
    assert "2,500/s (25.0x) (20%)" in gpu_row and "Ray is not installed here" in gpu_row
    assert "No GPU has run" not in text and "the CPU seeds 0.0500-0.0600" in text

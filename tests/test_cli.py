"""The CLI: clear argument errors with exit code 2, and the demo end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_rec.cli import main
from ray_rec.data.manifest import read_manifest

CLI = [sys.executable, "-m", "ray_rec.cli"]


def test_train_without_data_says_so(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--output", "out"])
    assert exc.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_train_on_a_folder_that_is_no_dataset(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a prepared dataset" in err and "Traceback" not in err


def test_bad_config_value_names_the_field(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--output", "o", "--set", "model.tracker=lstm"]) == 2
    assert "model.tracker='lstm'" in capsys.readouterr().err
    bad = tmp_path / "c.yaml"
    bad.write_text("model: {dimm: 3}\n")
    assert main(["train", "--data", str(tmp_path), "--output", "o", "--config", str(bad)]) == 2
    assert "unknown setting(s) in section 'model': dimm" in capsys.readouterr().err


def test_prepare_reports_a_missing_column(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("user,item_id,timestamp\na,b,1\n")
    assert main(["prepare", "--input", str(log), "--format", "events", "--output", str(tmp_path / "d")]) == 2
    assert "missing column(s) user_id" in capsys.readouterr().err


def test_prepare_maps_columns_and_event_values_from_its_flags(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("uid,sku,ts,action\n" + "".join(f"a,i{n},{n},{'buy' if n % 2 else 'seen'}\n" for n in range(6)) + "a,x,9,zap\n")
    out = str(tmp_path / "d")
    mapped = ["--columns", "user_id=uid,item_id=sku,timestamp=ts,event=action", "--click-events", "buy", "--browse-events", "seen"]
    assert main(["prepare", "--input", str(log), "--format", "events", "--output", out, *mapped]) == 0
    printed = capsys.readouterr().out
    assert "3 clicks" in printed and "dropped event values: 'zap' 1" in printed
    assert main(["prepare", "--input", str(log), "--format", "events", "--output", out, "--columns", "user_id"]) == 2
    assert "'user_id' is not field=column" in capsys.readouterr().err


def test_prepare_reads_its_mapping_from_the_config_file_and_train_reads_the_same_file(tmp_path, capsys):
    log = tmp_path / "log.csv"
    log.write_text("uid,sku,ts,action\n" + "".join(f"a,i{n},{n},{'buy' if n % 2 else 'seen'}\n" for n in range(6)))
    config = tmp_path / "run.yaml"
    config.write_text("prepare:\n  columns: {user_id: uid, item_id: sku, timestamp: ts, event: action}\n"
                      "  click_events: [buy]\n  browse_events: seen\n  min_clicks: 5\nmodel: {dim: 16}\n")
    out = str(tmp_path / "d")
    assert main(["prepare", "--input", str(log), "--output", out, "--config", str(config), "--min-clicks", "3"]) == 0
    assert "3 clicks" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest.split.min_clicks == 3 and manifest.source["click_events"] == ["buy"]  # the flag wins over the file
    from ray_rec.config import load_config

    assert load_config(str(config)).model.dim == 16
    config.write_text("prepare: {colums: {user_id: uid}}\n")
    assert main(["prepare", "--input", str(log), "--output", out, "--config", str(config)]) == 2
    assert "unknown setting(s) in section 'prepare': colums" in capsys.readouterr().err


def test_prepare_prints_counts(tmp_path, capsys):
    data = tmp_path / "seq.txt"
    data.write_text("1 1 2 3 4\n2 2 3 4\n3 9\n")
    assert main(["prepare", "--input", str(data), "--format", "seqtxt", "--output", str(tmp_path / "d"), "--num-shards", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 users, 5 items, 7 events" in out and "short_users 1" in out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the answer of a machine without a GPU")
def test_gpu_flags_on_a_machine_without_a_gpu_are_a_clear_error(ray_cluster, tiny_data, tmp_path, capsys, monkeypatch):
    """`--gpu` where the local Ray has no GPU fails at once (its work would wait for one forever)."""
    from tests.conftest import tiny_artifact

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    model = tiny_artifact(tmp_path / "model")
    for argv in (["train", "--data", tiny_data, "--output", str(tmp_path / "run"), "--gpu"],
                 ["batch-score", "--data", tiny_data, "--model", model, "--output", str(tmp_path / "top"), "--gpu"],
                 ["serve", "--model", model, "--gpu"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert ("no GPU that Ray sees" in err or "sees no GPU" in err) and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "top").exists()


def test_evaluate_with_a_missing_model_is_a_clear_error(tiny_data, capsys):
    assert main(["evaluate", "--data", tiny_data, "--model", "/nonexistent/model"]) == 2
    assert "is not a folder holding a ray_rec model" in capsys.readouterr().err



def test_batch_score_with_k_below_one_is_a_clear_error(tiny_data, capsys):
    assert main(["batch-score", "--data", tiny_data, "--model", "m", "--output", "o", "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert "--k must be at least 1, got 0" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [*CLI, "demo", "--users", "600", "--epochs", "4", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1], env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for needle in ("[1/6]", "[6/6]", "NDCG@10: model", "POST http://127.0.0.1", "/v1/events", "user_id=demo-user", "Next steps"):
        assert needle in out.stdout
    # Each epoch's progress line reaches the driver once (a worker's `print` used to arrive twice).
    assert (out.stdout + out.stderr).count("[ray-rec] epoch 1/4 ") == 1, out.stderr[-3000:]
    # The training workers' OpenMP threads sleep when idle (spinning ones stall on shared cores).
    assert re.search(r"\[ray-rec\] \d+ intra-op threads per worker \(OMP_WAIT_POLICY=PASSIVE\)", out.stderr), out.stderr[-3000:]
    # Ray Train's own per-report and per-checkpoint INFO lines repeat ours: silenced in the worker.
    # Nor does a local Ray start Ray Train's preemption watcher (no node of it can be drained),
    # whose start logged an error-level line about actor restarts.
    for chatter in ("Reporting training result", "Checkpoint successfully created", "PreemptionWatcher"):
        assert chatter not in out.stdout + out.stderr, out.stderr[-3000:]


def test_the_configuration_reference_is_generated_from_the_code_and_names_every_setting():
    """docs/configuration.md is `ray-rec config --reference`'s output, which lists every setting of
    every section with its real default."""
    import dataclasses

    from ray_rec.config import Config, ServeConfig, StateConfig
    from ray_rec.reference import reference

    text = reference()
    assert (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text() == text, \
        "docs/configuration.md is stale: ray-rec config --reference > docs/configuration.md"
    cfg, wrong = Config(), []
    for section in ("model", "data", "train", "eval"):
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            default = getattr(values, f.name)
            shown = "from the" if default is None else \
                f"`{str(default).lower() if isinstance(default, bool) else list(default) if isinstance(default, tuple) else default}`"
            row = re.search(rf"^\| `{section}\.{f.name}` \| `[^`]+` \| ([^|]+) \| (.+) \|$", text, re.M)
            if row is None or not row.group(1).startswith(shown) or not row.group(2).strip():
                wrong.append(f"{section}.{f.name}: {row.group(0) if row else 'missing'}")
    serve_keys = [k for k in ServeConfig.model_fields if k != "state"] + [f"state.{k}" for k in StateConfig.model_fields]
    for key in serve_keys:
        if not re.search(rf"^\| `{re.escape(key)}` \| .+ \| \S.* \|$", text, re.M):
            wrong.append(f"serve {key}")
    assert not wrong, wrong


def test_config_prints_the_resolved_configuration_and_refuses_bad_values_naming_field_and_file(tmp_path, capsys):
    """`ray-rec config` resolves a YAML file and overrides (YAML's string `1e-3` read as a number);
    a wrong type or an unknown key exits 2 naming the field and the file."""
    import yaml

    from ray_rec.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1e-3\n  epochs: 7\nmodel:\n  tracker: gru\n")
    assert main(["config", "--config", str(good), "--set", "model.dim=32"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["lr"] == 0.001 and resolved["train"]["epochs"] == 7
    assert resolved["model"]["tracker"] == "gru" and resolved["model"]["dim"] == 32
    for body, needle in [("train:\n  epochs: 2.5\n", "train.epochs=2.5 must be a whole number"),
                         ("train:\n  lr: fast\n", "train.lr='fast' must be a number"),
                         ("train:\n  final_fit: 1\n", "train.final_fit=1 must be true or false"),
                         ("model:\n  dimm: 32\n", "unknown setting(s) in section 'model': dimm")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(body)
        assert main(["config", "--config", str(bad)]) == 2
        err = capsys.readouterr().err
        assert needle in err and str(bad) in err, err
    assert main(["config", "--set", "train.epochs=2.5"]) == 2
    assert "train.epochs=2.5 must be a whole number" in capsys.readouterr().err


def test_resources_per_worker_must_be_a_json_object_of_amounts(tiny_data, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", tiny_data, "--output", "o", "--resources-per-worker", "{CPU: 1"])
    assert exc.value.code == 2 and "not JSON" in capsys.readouterr().err
    assert main(["train", "--data", tiny_data, "--output", "o", "--resources-per-worker", '{"CPU": -1}']) == 2
    err = capsys.readouterr().err
    assert "--resources-per-worker must map resource names to non-negative numbers" in err and "Traceback" not in err


def test_local_cluster_commands_without_a_cluster_say_so(tmp_path, capsys):
    assert main(["local-cluster", "status", "--folder", str(tmp_path / "none")]) == 2
    assert "no local cluster runs from" in capsys.readouterr().err


def test_local_cluster_never_takes_over_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["local-cluster", "up", "--folder", str(tmp_path)]) == 2
    assert "holds files of its own (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"

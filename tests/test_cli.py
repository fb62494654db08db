"""The CLI: clear argument errors with exit code 2, and the demo end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ray_rec.cli import main

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


def test_prepare_prints_counts(tmp_path, capsys):
    data = tmp_path / "seq.txt"
    data.write_text("1 1 2 3 4\n2 2 3 4\n3 9\n")
    assert main(["prepare", "--input", str(data), "--format", "seqtxt", "--output", str(tmp_path / "d"), "--num-shards", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 users, 5 items, 7 events" in out and "short_users 1" in out


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
    for needle in ("[1/6]", "[6/6]", "NDCG@10: model", "POST http://127.0.0.1", "Next steps"):
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


def test_readme_configuration_table_matches_the_defaults():
    """Every setting a user can change is in the README's table, with its real default."""
    import dataclasses

    from ray_rec.config import Config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cfg, wrong = Config(), []
    for section in ("model", "data", "train", "eval"):
        values = getattr(cfg, section)
        for f in dataclasses.fields(values):
            if f.name in ("num_items", "side_features"):  # filled from the data set's manifest
                continue
            default = getattr(values, f.name)
            if default is None:  # chosen from the data set (history length, dropout, tracker depth) or the loss (negatives)
                if not re.search(rf"\| `{section}\.{f.name}` \| from the (data|loss) \|", readme):
                    wrong.append(f"{section}.{f.name}: README does not say what chooses it")
                continue
            found = re.search(rf"\| `{section}\.{f.name}` \| `([^`]*)`", readme)
            expected = str(default).lower() if isinstance(default, bool) else str(default)
            if found is None or found.group(1) != expected:
                wrong.append(f"{section}.{f.name}: default {expected}, README {found.group(1) if found else 'missing'}")
    assert not wrong, wrong

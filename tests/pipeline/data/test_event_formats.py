"""`ckv data prepare` on logs as they come (pipeline/data/event_formats.py, event_values.py): separators and
extensions, text user / item ids, ISO-8601 / date / Parquet temporal times with a unit, placeholder genres,
and short previews of bad values. Every input is a small file the test writes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from collectivekv.cachestore.store.catalogue import load_catalogue
from collectivekv.cachestore.store.user_keys import BLAKE2B_63, INT, key_of
from collectivekv.jobs.cli import main
from collectivekv.pipeline.data.dataset_schema import CanonicalDataset, DataError, load_dataset
from collectivekv.pipeline.data.prepare import PrepareConfig, prepare

# a small log: 3 users × 4 events over 4 items, times 1..12 (seconds)
USERS = ["a1f0", "b2e1", "c3d2"]
ITEMS = ["N10", "N11", "N12", "N13"]
ROWS = [(USERS[k % 3], ITEMS[(k * 7) % 4], 1_700_000_000 + k, k % 2) for k in range(12)]


def _frame(**columns: list) -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["user", "item", "ts", "click"])
    for name, values in columns.items():
        df[name] = values
    return df


def _prep(tmp: Path, events: Path, out: str = "out", **cfg: object) -> CanonicalDataset:
    base: dict = {"user_col": "user", "item_col": "item", "time_col": "ts", "label_col": "click"}
    base.update(cfg)
    prepare(PrepareConfig(events=events, out=tmp / out, **base))  # type: ignore[arg-type]
    return load_dataset(tmp / out)


def _err(tmp: Path, events: Path, **cfg: object) -> str:
    with pytest.raises(DataError) as err:
        _prep(tmp, events, out="bad", **cfg)
    assert not (tmp / "bad").exists()
    return str(err.value)


# ---- separators and extensions -----------------------------------------------------------------------


def test_tab_separated_file_with_any_extension_needs_sep(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    _frame().to_csv(path, sep="\t", index=False)
    msg = _err(tmp_path, path)
    assert "unknown format" in msg and "--sep" in msg
    ds = _prep(tmp_path, path, sep="tab")
    assert ds.n_users == 3 and ds.meta["counts"]["events"] == 12
    semi = tmp_path / "log.dat"
    _frame().to_csv(semi, sep=";", index=False)
    assert _prep(tmp_path, semi, out="semi", sep=";").meta["counts"] == ds.meta["counts"]
    # a wrong separator: one column found, and the message says to give --sep
    wrong = _err(tmp_path, path, sep=",")
    assert "missing" in wrong and "--sep" in wrong


def test_tsv_and_recbole_inter_by_extension(tmp_path: Path) -> None:
    tsv = tmp_path / "log.tsv"
    _frame().to_csv(tsv, sep="\t", index=False)
    a = _prep(tmp_path, tsv, out="a")
    inter = tmp_path / "log.inter"  # RecBole: name:type headers match the plain names
    _frame().rename(columns={"user": "user:token", "item": "item:token", "ts": "ts:float", "click": "click:float"}
                    ).to_csv(inter, sep="\t", index=False)
    b = _prep(tmp_path, inter, out="b")
    assert a.histories.equals(b.histories) and a.meta["user_key"] == b.meta["user_key"] == BLAKE2B_63


def test_tab_separated_text_is_not_quoted(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    text = "user\titem\tts\tclick\ttitle\n" + "".join(
        f"{u}\t{i}\t{t}\t{c}\t\"quoted \"title\n" for u, i, t, c in ROWS)
    path.write_text(text)
    assert _prep(tmp_path, path).meta["counts"]["events"] == 12


# ---- text ids ------------------------------------------------------------------------------------------


def test_text_user_ids_are_keyed_by_blake2b_63(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _frame().to_csv(path, index=False)
    ds = _prep(tmp_path, path)
    assert ds.meta["user_key"] == ds.meta["item_key"] == BLAKE2B_63
    assert sorted(ds.histories["user_id"].to_pylist()) == sorted(key_of(u) for u in USERS)
    cat = ds.item_catalogue
    assert cat.item_key == BLAKE2B_63 and cat.user_key == BLAKE2B_63 and sorted(cat.names or ()) == ITEMS
    assert cat.to_dense(np.array([key_of("N12")])).tolist()[0] == cat.names.index("N12") + 1  # type: ignore[union-attr]
    assert cat.name_of(np.array([1, 2])).tolist() == list(cat.names[:2])  # type: ignore[index]
    # integer user ids with integer items: unchanged (their own keys)
    ints = tmp_path / "ints.csv"
    _frame(user=[7, 8, 9] * 4, item=[1, 2, 3, 4] * 3).to_csv(ints, index=False)
    di = _prep(tmp_path, ints, out="ints")
    assert di.meta["user_key"] == di.meta["item_key"] == INT
    assert sorted(di.histories["user_id"].to_pylist()) == [7, 8, 9]
    assert di.item_catalogue.names is None


def test_string_mode_keeps_the_exact_text(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _frame(user=["0042", "42", "7"] * 4).to_csv(path, index=False)
    ds = _prep(tmp_path, path, user_ids="string")
    assert sorted(ds.histories["user_id"].to_pylist()) == sorted(key_of(u) for u in ("0042", "42", "7"))
    # auto: all numbers → integer ids (0042 and 42 are one user)
    assert _prep(tmp_path, path, out="auto").n_users == 2
    # Parquet integers as text: their decimal digits
    pq_path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pandas(_frame(user=[7, 8, 9] * 4)), pq_path)
    dp = _prep(tmp_path, pq_path, out="pq", user_ids="string")
    assert sorted(dp.histories["user_id"].to_pylist()) == sorted(key_of(str(u)) for u in (7, 8, 9))


def test_int_mode_refuses_text_and_says_how(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _frame().to_csv(path, index=False)
    msg = _err(tmp_path, path, user_ids="int")
    assert "column 'user'" in msg and "non-numeric" in msg and "row 0" in msg and "--user-ids string" in msg


def test_two_ids_with_one_key_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import collectivekv.pipeline.data.event_values as ev

    path = tmp_path / "log.csv"
    _frame().to_csv(path, index=False)
    monkeypatch.setattr(ev, "hash_texts", lambda texts: np.zeros(len(list(texts)), np.int64))
    msg = _err(tmp_path, path)
    assert "same blake2b-63 key 0" in msg and "'a1f0'" in msg and "'b2e1'" in msg and "column 'user'" in msg


def test_text_item_catalogue_extends_day_to_day(tmp_path: Path) -> None:
    day1 = tmp_path / "day1.csv"
    _frame().to_csv(day1, index=False)
    d1 = _prep(tmp_path, day1, out="d1")
    day2 = tmp_path / "day2.csv"
    _frame(item=["N99", "N12", "N10", "N77"] * 3).to_csv(day2, index=False)
    d2 = _prep(tmp_path, day2, out="d2", catalogue=tmp_path / "d1")
    c1, c2 = d1.item_catalogue, d2.item_catalogue
    assert c2.extends(c1) and c2.names[: c1.n_items] == c1.names  # type: ignore[index]
    assert sorted(c2.names[c1.n_items:]) == ["N77", "N99"]  # type: ignore[index]
    assert load_catalogue(tmp_path / "d2").sha256 == c2.sha256
    # the next day cannot re-key the catalogue's items or users
    msg = _err(tmp_path, day2, item_ids="int", catalogue=tmp_path / "d1")
    assert "--item-ids int" in msg and "--new-catalogue" in msg
    ints = tmp_path / "ints.csv"
    _frame(user=[7, 8, 9] * 4).to_csv(ints, index=False)
    # auto follows the catalogue: integer-looking user ids stay text ids (their digits hashed)
    d3 = _prep(tmp_path, ints, out="d3", catalogue=tmp_path / "d1")
    assert d3.meta["user_key"] == BLAKE2B_63 and key_of("7") in d3.histories["user_id"].to_pylist()


def test_catalogue_with_text_ids_refuses_a_colliding_new_id(tmp_path: Path) -> None:
    from collectivekv.cachestore.store.catalogue import CatalogueError, ItemCatalogue

    cat = ItemCatalogue(np.array([5, 9]), (), ("x", "y"), BLAKE2B_63, BLAKE2B_63)
    assert cat.extend(np.array([9, 11]), names=(np.array([9, 11]), np.array(["y", "z"], object))).names == (
        "x", "y", "z")
    with pytest.raises(CatalogueError, match="same key 9"):
        cat.extend(np.array([9]), names=(np.array([9]), np.array(["w"], object)))
    with pytest.raises(CatalogueError, match="text ids"):
        ItemCatalogue(np.array([5, 9]), (), None, BLAKE2B_63)
    # an integer catalogue's hash does not depend on the key-scheme fields (INT, INT is the default)
    assert ItemCatalogue(np.array([3, 1])).sha256 == ItemCatalogue(np.array([3, 1]), (), None, INT, INT).sha256


# ---- times --------------------------------------------------------------------------------------------


def test_iso_8601_times_in_csv(tmp_path: Path) -> None:
    iso = ["2023-05-14T09:12:00Z", "2023-05-14T11:12:00+02:00", "2023-05-14", "2023-05-14 09:12:01"] * 3
    path = tmp_path / "log.csv"
    _frame(ts=iso).to_csv(path, index=False)
    ds = _prep(tmp_path, path)
    base = int(pd.Timestamp("2023-05-14T09:12:00Z").timestamp())
    stamps = sorted(set(np.concatenate(ds.histories["timestamps"].to_numpy(zero_copy_only=False)).tolist()))
    assert stamps == [base - 9 * 3600 - 12 * 60, base, base + 1]  # the date: midnight UTC; +02:00 → 09:12Z
    assert ds.meta["time"] == {"column": "ts", "input": "iso-8601", "unit": "s"}
    ms = _prep(tmp_path, path, out="ms", time_unit="ms")
    assert ms.meta["splits"]["test_start"] == 1000 * ds.meta["splits"]["test_start"]
    assert ms.meta["time"]["unit"] == "ms"


def test_parquet_date32_and_timestamp_columns(tmp_path: Path) -> None:
    days = [dt.date(2024, 1, 1 + k) for k in range(12)]
    table = pa.Table.from_pandas(_frame(ts=days)).set_column(2, "ts", pa.array(days, pa.date32()))
    path = tmp_path / "dates.parquet"
    pq.write_table(table, path)
    ds = _prep(tmp_path, path)
    assert ds.meta["time"]["input"] == "date"
    assert ds.meta["splits"]["valid_start"] == int(pd.Timestamp("2024-01-10", tz="UTC").timestamp())
    stamps = pa.array([1_700_000_000_000 + k for k in range(12)], pa.timestamp("ms", tz="Europe/Berlin"))
    path = tmp_path / "stamps.parquet"
    pq.write_table(pa.Table.from_pandas(_frame()).set_column(2, "ts", stamps), path)
    ms = _prep(tmp_path, path, out="ms", time_unit="ms")
    assert ms.meta["time"]["input"] == "timestamp"
    assert ms.meta["splits"]["test_start"] == 1_700_000_000_000 + 10


def test_numbers_stay_in_their_stated_unit_and_time_format(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _frame().to_csv(path, index=False)
    ds = _prep(tmp_path, path, time_unit="ms")  # numbers: taken as they are, the unit recorded
    assert ds.meta["splits"]["test_start"] == 1_700_000_010 and ds.meta["time"]["input"] == "number"
    mind = tmp_path / "mind.csv"
    _frame(ts=[f"11/{k + 1}/2019 {1 + k % 12}:05:00 {'AM' if k < 6 else 'PM'}" for k in range(12)]).to_csv(
        mind, index=False)
    dm = _prep(tmp_path, mind, out="mind", time_format="%m/%d/%Y %I:%M:%S %p")
    assert dm.meta["time"]["input"] == "format"
    assert dm.meta["splits"]["test_start"] == int(pd.Timestamp("2019-11-11 23:05:00", tz="UTC").timestamp())
    assert "--time-format" in _err(tmp_path, mind, time_format="%Y-%m-%d")


def test_bad_times_name_the_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    _frame(ts=["2023-05-14T09:12:00Z"] * 5 + ["14.05.2023"] + ["2023-05-15"] * 6).to_csv(path, index=False)
    msg = _err(tmp_path, path)
    assert "column 'ts'" in msg and "ISO-8601" in msg and "row 5" in msg and "'14.05.2023'" in msg
    _frame(ts=list(range(11)) + ["2023-05-14"]).to_csv(path, index=False)  # numbers with a stray date
    msg = _err(tmp_path, path)
    assert "non-numeric" in msg and "row 11" in msg


# ---- genres, previews ----------------------------------------------------------------------------------


def test_placeholder_genres_are_configurable(tmp_path: Path) -> None:
    events, items = tmp_path / "log.csv", tmp_path / "items.tsv"
    _frame().to_csv(events, index=False)
    pd.DataFrame({"item": ITEMS, "genres": ["unknown|Drama", "Unknown", "Comedy", "(no genres listed)"]}).to_csv(
        items, sep="\t", index=False)
    kept = _prep(tmp_path, events, out="kept", items=items)
    assert kept.genres == ["Comedy", "Drama", "Unknown", "unknown"]
    ds = _prep(tmp_path, events, items=items, ignore_genres=("unknown",))
    assert ds.genres == ["Comedy", "Drama"] and ds.meta["counts"]["items_without_genres"] == 2
    res = CliRunner().invoke(main, ["data", "prepare", "--events", str(events), "--items", str(items),
                                    "--user-col", "user", "--item-col", "item", "--time-col", "ts",
                                    "--label-col", "click", "--ignore-genre", "UNKNOWN", "--out",
                                    str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "genres 2" in res.output


def test_a_list_in_a_numeric_field_shows_a_short_preview(tmp_path: Path) -> None:
    table = pa.Table.from_pandas(_frame()).append_column("rating", pa.array([list(range(300))] * 12))
    path = tmp_path / "lists.parquet"
    pq.write_table(table, path)
    msg = _err(tmp_path, path, label_col=None, rating_col="rating", rating_threshold=4.0)
    assert "column 'rating'" in msg and "list value(s)" in msg and "[0, 1, 2, … (300 values)]" in msg
    assert len(msg) < 400 and "299" not in msg
    table = pa.Table.from_pandas(_frame()).set_column(0, "user", pa.array([[1, 2]] * 12))
    pq.write_table(table, path)
    assert "list value(s) where one id is expected" in _err(tmp_path, path)
    path = tmp_path / "long.csv"
    _frame(ts=["x" * 5000] * 12).to_csv(path, index=False)
    msg = _err(tmp_path, path)
    assert "(5000 characters)" in msg and len(msg) < 400

"""Readers on tiny fixtures in the real formats, each with deliberately bad lines."""

from __future__ import annotations

import gzip
import shutil

import pandas as pd
import pytest

from pagellm.config import DataConfig
from pagellm.data.readers import read_source
from pagellm.data.schema import DataSourceError


def _read(source, path, **kwargs):
    return read_source(DataConfig(source=source, path=str(path), **kwargs))


def _rows(result):
    return [tuple(r) for r in result.interactions.itertuples(index=False)]


def _items(result):
    return {r.item_id: (r.categories, r.brand, r.title) for r in result.items.itertuples(index=False)}


def _reasons_by_line(result, source):
    frame = result.rejects.frame()
    return frame[frame["source"] == source].set_index("line")["reason"].to_dict()


@pytest.mark.parametrize("target", ["amazon2014", "amazon2014/reviews_Toy_5.json.gz"])
def test_amazon_2014_folder_or_file(fixtures_dir, target):
    result = _read("amazon", fixtures_dir / target)
    assert _rows(result) == [
        ("U1", "I1", 5.0, 1000), ("U1", "I2", 4.0, 1100), ("U2", "I1", 3.0, 1200),
        ("U2", "I3", 1.0, 800), ("U4", "I2", 1.0, 1500),
    ]
    assert _reasons_by_line(result, "reviews_Toy_5.json.gz") == {
        4: "unparseable", 5: "missing_id", 6: "bad_rating", 7: "bad_timestamp", 8: "duplicate", 9: "duplicate",
    }
    assert _reasons_by_line(result, "meta_Toy.json.gz") == {3: "unparseable"}  # a python-literal line cut short
    assert result.rejects.counts() == {
        "unparseable": 2, "missing_id": 1, "bad_rating": 1, "bad_timestamp": 1, "duplicate": 2,
    }
    # 2014 meta: python literals, first category path; I3's line is broken, I9 was never reviewed.
    assert _items(result) == {
        "I1": (["Toys & Games", "Puzzles", "Jigsaw"], "Acme", "Wooden Puzzle"),
        "I2": (["Toys & Games", "Outdoor"], None, 'Kid\'s "Fun" Kite'),
    }
    assert result.rating_scale == (1.0, 5.0)
    assert "1 of 3 items have no metadata: they get category []" in result.notes


def test_amazon_2018_review_time_and_meta(fixtures_dir):
    result = _read("amazon", fixtures_dir / "amazon2018")
    # "3 1, 2016" (no unixReviewTime) is 2016-03-01 00:00 UTC.
    assert _rows(result) == [
        ("A1", "B1", 5.0, 1095465600), ("A1", "B2", 3.0, 1456790400), ("A3", "B1", 1.0, 1400000000),
    ]
    assert _reasons_by_line(result, "Toy_5.json") == {
        3: "bad_timestamp", 4: "bad_timestamp", 5: "missing_id", 6: "bad_rating", 7: "unparseable",
    }
    assert _reasons_by_line(result, "meta_Toy.json") == {3: "duplicate"}
    # HTML fragments scraped into `category` are dropped; an empty brand is None.
    assert _items(result) == {"B1": (["Toys & Games", "Robots"], "RoboCo", "Robot"), "B2": ([], None, "Ball")}


@pytest.mark.parametrize("target", ["amazon2023", "amazon2023/Toy.jsonl.gz"])
def test_amazon_2023_milliseconds_and_parent_asin(fixtures_dir, target):
    result = _read("amazon", fixtures_dir / target)  # a lone file finds its meta_<category> file
    assert _rows(result) == [
        ("AE1", "P1", 5.0, 1588687728), ("AE1", "P2", 2.0, 1588687729), ("AE2", "P2", 3.0, 1600000000),
    ]
    assert result.rejects.counts() == {"bad_timestamp": 1}
    assert _items(result) == {
        "P1": (["Toys & Games", "Drones"], "Sky", "Drone"),  # details.Brand before store
        "P2": (["Toys & Games"], "YoStore", "Yo-yo"),  # empty path: main_category
    }


def test_amazon_without_metadata_says_so(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "amazon2014" / "reviews_Toy_5.json.gz", tmp_path)
    result = _read("amazon", tmp_path)
    assert result.items.empty and list(result.items.columns) == ["item_id", "categories", "brand", "title"]
    assert result.notes == ["no item metadata: every item gets category []"]
    assert len(result.interactions) == 5


def test_amazon_truncated_gzip_is_a_clear_error(fixtures_dir, tmp_path):
    data = (fixtures_dir / "amazon2014" / "reviews_Toy_5.json.gz").read_bytes()
    (tmp_path / "reviews_Cut_5.json.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match="reviews_Cut_5.json.gz: cannot be read to the end"):
        _read("amazon", tmp_path)


def test_amazon_folder_without_reviews(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataSourceError, match=r"no review files.*found \['notes.txt'\]"):
        _read("amazon", tmp_path)


def test_movielens_csv(fixtures_dir):
    result = _read("movielens", fixtures_dir / "movielens_csv")
    assert _rows(result) == [
        ("1", "31", 2.5, 1260759144), ("1", "1029", 3.0, 1260759179), ("1", "1061", 0.5, 1260759182),
        ("2", "31", 4.0, 835355493), ("3", "1029", 1.0, 1298861589),
    ]
    # Line 9 has a fifth field.
    assert _reasons_by_line(result, "ratings.csv") == {
        6: "bad_rating", 7: "bad_timestamp", 8: "missing_id", 9: "unparseable", 11: "duplicate",
    }
    assert _items(result) == {
        "31": (["Drama"], None, "Dangerous Minds (1995)"),
        "1029": (["Animation", "Children", "Drama", "Musical"], None, "Dumbo (1941)"),
        "1061": ([], None, "Sleepers, The (1996)"),  # "(no genres listed)"; quoted comma in title
    }
    assert result.rating_scale == (0.5, 5.0)
    assert "1 rated movies have no genre: they get category []" in result.notes


def test_movielens_dat_latin1(fixtures_dir):
    result = _read("movielens", fixtures_dir / "movielens_dat" / "ratings.dat")
    assert _rows(result) == [
        ("1", "1193", 5.0, 978300760), ("1", "661", 3.0, 978302109),
        ("2", "1193", 4.0, 978298413), ("2", "3408", 4.0, 978300000),
    ]
    assert _reasons_by_line(result, "ratings.dat") == {3: "unparseable", 5: "bad_rating"}
    assert _items(result)["3408"] == (["Comedy"], None, "Café au lait (1993)")
    assert _items(result)["661"][0] == ["Animation", "Children's", "Musical"]


def test_rating_scale_override(fixtures_dir):
    result = _read("movielens", fixtures_dir / "movielens_csv", rating_scale=(1.0, 5.0))
    assert result.rating_scale == (1.0, 5.0)
    assert result.rejects.counts()["bad_rating"] == 2  # 7 and now 0.5


def test_movielens_folder_without_ratings(tmp_path):
    (tmp_path / "movies.csv").write_text("movieId,title,genres\n1,A,Drama\n")
    with pytest.raises(DataSourceError, match=r"no ratings.csv or ratings.dat.*found \['movies.csv'\]"):
        _read("movielens", tmp_path)


def test_sequence_with_datamaps_and_item_file(fixtures_dir):
    result = _read("sequence", fixtures_dir / "sequence")
    # Original ids from datamaps.json; timestamp = position in the user's sequence.
    frame = result.interactions
    assert frame[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["AU1", "ASIN01", 0], ["AU1", "ASIN02", 1], ["AU1", "ASIN03", 2],
        ["AU2", "ASIN02", 0], ["AU2", "ASIN04", 1], ["AU2", "ASIN01", 2],
        ["AU3", "ASIN03", 0], ["AU3", "ASIN01", 2],
    ]
    assert frame["rating"].isna().all() and result.rating_scale is None
    assert result.rejects.counts() == {"missing_id": 1, "duplicate": 1}  # item index 99; ASIN02 again
    assert "(not in id2item)" in result.rejects.frame().query("reason == 'missing_id'")["raw"].item()
    assert _items(result) == {
        "ASIN01": (["Beauty", "Makeup", "Lips"], "COKA", "Lip Balm"),
        "ASIN02": (["Beauty", "Men's", "Shaving"], None, "Tab\t in title"),
        "ASIN03": (["Beauty"], "XB", None),
    }
    assert result.notes == [
        "no ratings: implicit feedback",
        "no timestamps: sequence order used as timestamp",
        "1 of 4 items have no metadata: they get category []",
    ]


def test_sequence_without_datamaps_keeps_indices(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "sequence" / "sequential_data.txt", tmp_path / "seq.txt")
    result = _read("sequence", tmp_path / "seq.txt")
    assert result.interactions["user_id"].unique().tolist() == ["1", "2", "3"]
    assert len(result.interactions) == 9 and result.rejects.counts() == {"duplicate": 1}
    assert any("no datamaps.json" in note for note in result.notes)
    assert result.items.empty


CUSTOM = {"user_id": "uid", "item_id": "product", "rating": "stars", "timestamp": "when",
          "category": "cat", "brand": "maker", "title": "name"}


def test_csv_with_column_mapping_and_items(fixtures_dir):
    folder = fixtures_dir / "csv_custom"
    result = _read("csv", folder / "events.csv", columns=CUSTOM, items_path=str(folder / "items.csv"))
    # The ISO date string is read as epoch seconds; duplicates keep the earliest time.
    assert _rows(result) == [("u1", "p1", 5.0, 1000), ("u1", "p2", 4.0, 1476619200),
                             ("u2", "p1", 5.0, 1100), ("u3", "p3", 2.0, 1500)]
    assert _reasons_by_line(result, "events.csv") == {
        4: "duplicate", 5: "bad_timestamp", 6: "missing_id", 7: "bad_rating", 10: "unparseable",  # too few fields
    }
    assert _items(result) == {
        "p1": (["Toys", "Puzzles"], "Acme", "Puzzle"), "p2": (["Toys"], None, "Kite"), "p3": ([], "Zed", None),
    }


def test_csv_missing_mapped_column_names_it(fixtures_dir):
    expected = r"column for rating \(data.columns.rating = 'score'\) not found; columns present: \['uid'"
    with pytest.raises(DataSourceError, match=expected):
        _read("csv", fixtures_dir / "csv_custom" / "events.csv", columns={**CUSTOM, "rating": "score"})
    with pytest.raises(DataSourceError, match=r"column for user_id \(default name 'user_id'\)"):
        _read("csv", fixtures_dir / "csv_custom" / "events.csv")


def test_csv_without_rating_or_timestamp(tmp_path):
    path = tmp_path / "clicks.csv"
    path.write_text("user,item\na,x\nb,x\na,y\na,x\n")
    result = _read("csv", path, columns={"user_id": "user", "item_id": "item"})
    assert _rows(result)[0][:2] == ("a", "x")
    assert result.interactions[["user_id", "item_id", "timestamp"]].values.tolist() == [
        ["a", "x", 0], ["b", "x", 0], ["a", "y", 1],
    ]
    assert result.rating_scale is None and result.rejects.counts() == {"duplicate": 1}
    assert "no ratings: implicit feedback" in result.notes
    assert "no timestamps: file row order used as timestamp" in result.notes


def test_parquet_with_datetimes_and_list_categories(tmp_path):
    events = pd.DataFrame(
        {
            "u": [1, 1, 2],
            "i": ["x", "y", "x"],
            "r": [4.0, 2.0, 9.0],
            "t": pd.to_datetime(["2020-01-01", "2020-01-02", "2020-01-03"], utc=True),
        }
    )
    events.to_parquet(tmp_path / "events.parquet")
    items = pd.DataFrame({"i": ["x", "y"], "category": [["A", "B"], []], "title": ["X", None]})
    items.to_parquet(tmp_path / "items.parquet")
    result = _read(
        "parquet", tmp_path / "events.parquet", items_path=str(tmp_path / "items.parquet"),
        columns={"user_id": "u", "item_id": "i", "rating": "r", "timestamp": "t"},
    )
    assert _rows(result) == [("1", "x", 4.0, 1577836800), ("1", "y", 2.0, 1577923200)]
    assert result.rejects.counts() == {"bad_rating": 1}
    assert _items(result) == {"x": (["A", "B"], None, "X"), "y": ([], None, None)}


def test_missing_empty_and_rowless_sources(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        _read("movielens", tmp_path / "nowhere")
    (tmp_path / "ratings.csv").write_text("")
    with pytest.raises(DataSourceError, match="is empty"):
        _read("movielens", tmp_path / "ratings.csv")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataSourceError, match="no valid interactions out of 0 rows"):
        _read("movielens", tmp_path)
    (tmp_path / "reviews_X.json.gz").write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(DataSourceError, match="no valid interactions"):
        _read("amazon", tmp_path / "reviews_X.json.gz")


def test_simulator_is_not_a_file_source():
    with pytest.raises(ValueError, match="not a file source"):
        read_source(DataConfig(source="simulator"))


def test_amazon_source_reads_a_p5_sequence_folder(fixtures_dir):
    """`data.source=amazon` on a folder holding only sequential_data.txt uses the sequence reader."""
    from pagellm.config import DataConfig
    from pagellm.data.readers import read_source

    as_amazon = read_source(DataConfig(source="amazon", path=str(fixtures_dir / "sequence")))
    as_sequence = read_source(DataConfig(source="sequence", path=str(fixtures_dir / "sequence")))
    assert as_amazon.interactions.equals(as_sequence.interactions)
    assert as_amazon.rating_scale is None

"""validate_interactions / canonical_items / finish_read: every bad row gets exactly one reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pagellm.data.schema import DataSourceError, Rejects
from pagellm.data.validate import (
    canonical_items,
    finish_read,
    record_rejects,
    require_path,
    validate_interactions,
)


def _raw(rows, **extra):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"], dtype=object)
    for name, values in extra.items():
        frame[name] = values
    return frame


def test_each_reason_counted_and_good_rows_exact():
    raw = _raw(
        [
            ("u1", "i1", "5", "100"),  # good
            ("u1", "", "4", "101"),  # missing item id
            (None, "i2", "4", "102"),  # missing user id
            ("u2", "i1", "7", "103"),  # rating outside 1-5
            ("u2", "i2", "great", "104"),  # rating not a number
            ("u2", "i3", "3", "yesterday"),  # timestamp not a number
            ("u2", "i4", "3", "-1"),  # negative timestamp
            ("u2", "i5", "3", "inf"),  # non-finite timestamp
            ("u1", "i1", "2", "200"),  # later repeat of row 0
            ("u3", "i1", " 2.5 ", " 300 "),  # good: whitespace is not an error
        ],
        _line=list(range(10, 20)),
    )
    rejects = Rejects()
    out = validate_interactions(raw, (1.0, 5.0), rejects, "test.csv")
    assert rejects.counts() == {"missing_id": 2, "bad_rating": 2, "bad_timestamp": 3, "duplicate": 1}
    assert out.to_dict("list") == {
        "user_id": ["u1", "u3"],
        "item_id": ["i1", "i1"],
        "rating": [5.0, 2.5],
        "timestamp": [100, 300],
    }
    assert str(out["rating"].dtype) == "float64" and str(out["timestamp"].dtype) == "int64"
    assert pd.api.types.is_string_dtype(out["user_id"]) and pd.api.types.is_string_dtype(out["item_id"])
    frame = rejects.frame()
    assert set(frame["source"]) == {"test.csv"}
    assert frame.set_index("line")["reason"].to_dict() == {
        11: "missing_id", 12: "missing_id", 13: "bad_rating", 14: "bad_rating",
        15: "bad_timestamp", 16: "bad_timestamp", 17: "bad_timestamp", 18: "duplicate",
    }
    assert "yesterday" in frame.loc[frame["line"] == 15, "raw"].item()


def test_first_reason_wins_and_row_counted_once():
    raw = _raw([("", "i1", "9", "never")])
    rejects = Rejects()
    with_nothing = validate_interactions(raw, (1.0, 5.0), rejects, "s")
    assert with_nothing.empty
    assert rejects.counts() == {"missing_id": 1}


def test_duplicate_keeps_earliest_timestamp_then_first_seen():
    raw = _raw(
        [
            ("u", "i", 4.0, 50),  # later in time: rejected
            ("u", "i", 2.0, 10),  # earliest: kept
            ("u", "i", 3.0, 10),  # same time, seen after: rejected
            ("v", "i", 1.0, 99),
        ]
    )
    rejects = Rejects()
    out = validate_interactions(raw, (1.0, 5.0), rejects, "s")
    assert out[["user_id", "rating", "timestamp"]].values.tolist() == [["u", 2.0, 10], ["v", 1.0, 99]]
    assert sorted(r["line"] for r in rejects.rows) == [1, 3]  # 1-based rows when no _line
    assert rejects.counts() == {"duplicate": 2}


def test_a_rejected_row_does_not_shadow_a_valid_pair():
    # The first (u, i) row is bad; the second is the first *valid* one and must be kept.
    raw = _raw([("u", "i", 8.0, 1), ("u", "i", 4.0, 2)])
    rejects = Rejects()
    out = validate_interactions(raw, (1.0, 5.0), rejects, "s")
    assert out["rating"].tolist() == [4.0]
    assert rejects.counts() == {"bad_rating": 1}


def test_implicit_data_skips_rating_check_but_not_garbage():
    raw = _raw([("u", "a", None, 0), ("u", "b", np.nan, 1), ("u", "c", "", 2), ("u", "d", "x", 3)])
    rejects = Rejects()
    out = validate_interactions(raw, None, rejects, "s")
    assert out["item_id"].tolist() == ["a", "b", "c"]
    assert out["rating"].isna().all()
    assert rejects.counts() == {"bad_rating": 1}


def test_native_dtypes_and_float_ids():
    raw = pd.DataFrame(
        {
            "user_id": [1.0, 2.0, np.nan],  # ints with a gap, as pandas reads them
            "item_id": np.array([10, 11, 12], dtype=np.int64),
            "rating": [1.0, 5.0, 3.0],
            "timestamp": [1.5e9 + 0.7, 2.0, 3.0],  # fractions are floored
        }
    )
    rejects = Rejects()
    out = validate_interactions(raw, (1.0, 5.0), rejects, "s")
    assert out["user_id"].tolist() == ["1", "2"]
    assert out["item_id"].tolist() == ["10", "11"]
    assert out["timestamp"].tolist() == [1500000000, 2]
    assert rejects.counts() == {"missing_id": 1}


def test_per_row_source_and_raw_text_are_used():
    raw = _raw([("u", "i", 9, 1)], _source=["a.json"], _raw=['{"the": "line"}'], _line=[7])
    rejects = Rejects()
    validate_interactions(raw, (1.0, 5.0), rejects, "fallback")
    assert rejects.rows == [{"reason": "bad_rating", "source": "a.json", "line": 7, "raw": '{"the": "line"}'}]


def test_many_rejects_take_the_bulk_path():
    n = 50_000
    raw = _raw([("u", str(i), 9, i) for i in range(n)])
    rejects = Rejects()
    out = validate_interactions(raw, (1.0, 5.0), rejects, "s")
    assert out.empty and rejects.counts() == {"bad_rating": n}


def test_record_rejects_refuses_unknown_reason():
    with pytest.raises(ValueError, match="unknown reject reasons"):
        record_rejects(Rejects(), ["made_up"], "s", [1], ["x"])


def test_canonical_items_counts_missing_and_repeated_ids():
    items = pd.DataFrame(
        {
            "item_id": ["a", "", "a", "b"],
            "categories": [["X", " Y "], [], ["Z"], None],
            "brand": ["B", None, "C", "  "],
            "title": [np.nan, "t", "u", "T"],
        }
    )
    rejects = Rejects()
    out = canonical_items(items, rejects, "meta.json")
    assert out.to_dict("list") == {
        "item_id": ["a", "b"], "categories": [["X", "Y"], []], "brand": ["B", None], "title": [None, "T"],
    }
    assert rejects.counts() == {"missing_id": 1, "duplicate": 1}


def test_finish_read_refuses_zero_valid_rows_and_says_why():
    raw = _raw([("u", "i", 9, 1), ("", "i", 3, 1)])
    with pytest.raises(DataSourceError, match=r"no valid interactions out of 2 rows.*bad_rating"):
        finish_read(raw, None, Rejects(), (1.0, 5.0), [], source="s", where="/some/file.csv")


def test_finish_read_keeps_metadata_of_interacted_items_only():
    raw = _raw([("u", "a", 5, 1), ("u", "b", 5, 2)])
    items = canonical_items(
        pd.DataFrame({"item_id": ["a", "z"], "categories": [["C"], ["D"]], "brand": None, "title": None}),
        Rejects(), "m",
    )
    result = finish_read(raw, items, Rejects(), (1.0, 5.0), ["given"], source="s", where="w")
    assert result.items["item_id"].tolist() == ["a"]
    assert result.notes == ["given", "1 of 2 items have no metadata: they get category []"]
    no_meta = finish_read(raw, None, Rejects(), (1.0, 5.0), [], source="s", where="w")
    assert no_meta.items.empty and no_meta.notes == ["no item metadata: every item gets category []"]


def test_require_path_messages(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist; expected a ratings file"):
        require_path(tmp_path / "nope.csv", "a ratings file")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataSourceError, match="is empty"):
        require_path(empty, "a ratings file")
    with pytest.raises(DataSourceError, match="no data.path"):
        require_path(None, "a ratings file")

"""Interaction-log readers and the k-core filter, on small files written here (no MovieLens data)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attnrec.export.data.filters import KCoreReport, kcore
from attnrec.export.data.log import DataError, InteractionLog
from attnrec.export.data.readers import FORMATS, detect_format, read_interactions


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def assert_log(log, users, items, times):
    np.testing.assert_array_equal(log.user, users)
    np.testing.assert_array_equal(log.item, items)
    np.testing.assert_array_equal(log.timestamp, np.asarray(times, dtype=np.float64))
    assert log.timestamp.dtype == np.float64


# --- generic CSV / TSV / Parquet ---------------------------------------------------------------


def test_csv_integer_ids(tmp_path):
    path = write(tmp_path, "log.csv", "user_id,item_id,rating,timestamp\n1,10,5,100\n2,20,3,90.5\n1,30,4,101\n")
    log = read_interactions(path)
    assert log.user.dtype == np.int64 and log.item.dtype == np.int64
    assert_log(log, [1, 2, 1], [10, 20, 30], [100, 90.5, 101])
    assert log.source == str(path)


def test_csv_string_ids_stay_strings(tmp_path):
    # "007" must not become 7: ids read back as written.
    path = write(tmp_path, "log.csv", "user,item,time\nalice,007,1\nbob,x y,2\n")
    log = read_interactions(path)
    assert log.user.dtype.kind == "U" and log.item.dtype.kind == "U"
    assert_log(log, ["alice", "bob"], ["007", "x y"], [1, 2])


def test_ids_beyond_int64_stay_strings(tmp_path):
    path = write(tmp_path, "log.csv", "uid,iid,ts\n99999999999999999999,1,1\n")
    assert read_interactions(path).user.tolist() == ["99999999999999999999"]


def test_tsv_with_common_names(tmp_path):
    path = write(tmp_path, "log.tsv", "userId\tmovieId\tts\n7\t8\t3\n9\t8\t4\n")
    assert_log(read_interactions(path), [7, 9], [8, 8], [3, 4])


def test_column_names_ignore_case(tmp_path):
    path = write(tmp_path, "log.csv", "UserID,ItemId,TimeStamp\n1,2,3\n")
    assert_log(read_interactions(path), [1], [2], [3])


def test_configurable_columns(tmp_path):
    path = write(tmp_path, "log.csv", "who,what,when,user_id\n1,2,30,99\n3,4,40,99\n")
    log = read_interactions(path, user_col="who", item_col="what", time_col="when")
    assert_log(log, [1, 3], [2, 4], [30, 40])


def test_quoted_csv_fields(tmp_path):
    path = write(tmp_path, "log.csv", 'user_id,item_id,timestamp\n"a,b",i1,5\n')
    assert_log(read_interactions(path), ["a,b"], ["i1"], [5])


@pytest.mark.parametrize(
    "stamps, seconds",
    [
        (["2020-01-01T00:00:00Z", "2020-01-01T02:00:01+02:00"], [1577836800, 1577836801]),
        (["2020-01-01 00:00:00", "2020-01-01T00:00:00.5"], [1577836800, 1577836800.5]),
        (["2020-01-01", "2020-01-02"], [1577836800, 1577923200]),
    ],
)
def test_iso_timestamps(tmp_path, stamps, seconds):
    rows = "".join(f"{i},{i},{s}\n" for i, s in enumerate(stamps))
    path = write(tmp_path, "log.csv", "user_id,item_id,datetime\n" + rows)
    assert_log(read_interactions(path), [0, 1], [0, 1], seconds)


def test_no_timestamp_column_uses_row_order(tmp_path, caplog):
    path = write(tmp_path, "log.csv", "user_id,item_id\n5,1\n6,2\n5,3\n")
    with caplog.at_level(logging.WARNING):
        log = read_interactions(path)
    assert_log(log, [5, 6, 5], [1, 2, 3], [0, 1, 2])
    assert "row order" in caplog.text and "log.csv" in caplog.text


def test_blank_lines_are_skipped(tmp_path):
    path = write(tmp_path, "log.csv", "user_id,item_id,timestamp\n1,2,3\n\n4,5,6\n\n")
    assert_log(read_interactions(path), [1, 4], [2, 5], [3, 6])


def test_parquet(tmp_path):
    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "user_id": pa.array([3, 1], pa.int32()),
            "item_id": ["a", "b"],
            "timestamp": pa.array([1_000, 2_500], pa.timestamp("ms")),
        }
    )
    pq.write_table(table, path)
    log = read_interactions(path)
    assert log.user.dtype == np.int64
    assert_log(log, [3, 1], ["a", "b"], [1.0, 2.5])


def test_parquet_configurable_and_string_times(tmp_path):
    path = tmp_path / "events.pq"
    pq.write_table(pa.table({"u": ["1", "2"], "i": [5, 6], "t": ["2020-01-01", "2020-01-02"]}), path)
    log = read_interactions(path, "parquet", user_col="u", item_col="i", time_col="t")
    assert_log(log, [1, 2], [5, 6], [1577836800, 1577923200])


def test_parquet_null_id_names_the_row(tmp_path):
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1, None, 3], "item_id": [1, 2, 3], "timestamp": [1.0, 2.0, 3.0]}), path)
    with pytest.raises(DataError, match=r"log\.parquet: row 2: empty user id"):
        read_interactions(path)


# --- MovieLens, RecBole, SASRec ----------------------------------------------------------------


def test_movielens_u_data(tmp_path):
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert_log(read_interactions(path), [196, 186], [242, 302], [881250949, 891717742])


def test_movielens_ratings_dat(tmp_path):
    path = write(tmp_path, "ratings.dat", "1::1193::5::978300760\n2::661::3::978302109\n")
    assert_log(read_interactions(path), [1, 2], [1193, 661], [978300760, 978302109])


def test_movielens_ratings_csv(tmp_path):
    path = write(
        tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,307,3.5,1256677221\n1,481,3.5,1256677456\n"
    )
    for fmt in ("auto", "movielens"):
        assert_log(read_interactions(path, fmt), [1, 1], [307, 481], [1256677221, 1256677456])


@pytest.mark.parametrize(
    "text",
    ["1::10::5::100\n", "1\t10\t5\t100\n", "userId,movieId,rating,timestamp\n1,10,5,100\n"],
)
def test_movielens_layout_from_content(tmp_path, text):
    path = write(tmp_path, "some-ratings", text)
    assert_log(read_interactions(path, "movielens"), [1], [10], [100])


def test_movielens_fixed_layout_refuses_column_names(tmp_path):
    path = write(tmp_path, "u.data", "1\t2\t3\t4\n")
    with pytest.raises(ValueError, match="user_col"):
        read_interactions(path, user_col="x")


def test_recbole_inter(tmp_path):
    text = (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n22\t377\t1\t878887116\n"
    )
    path = write(tmp_path, "toy.inter", text)
    assert_log(read_interactions(path), [196, 22], [242, 377], [881250949, 878887116])


def test_recbole_custom_fields(tmp_path):
    text = "session:token\tproduct:token\twhen:float\nA\tp1\t2.5\nB\tp2\t3\n"
    path = write(tmp_path, "toy.inter", text)
    log = read_interactions(path, "recbole", user_col="session", item_col="product", time_col="when")
    assert_log(log, ["A", "B"], ["p1", "p2"], [2.5, 3])


def test_sasrec_text(tmp_path):
    path = write(tmp_path, "Beauty.txt", "1 5\n1  6\n2\t5\n")
    assert detect_format(path) == "sasrec"
    assert_log(read_interactions(path), [1, 1, 2], [5, 6, 5], [0, 1, 2])


def test_s3rec_user_sequences(tmp_path):
    """One line per user, items oldest first: each line becomes that user's interactions in order."""
    path = write(tmp_path, "Toys_and_Games.txt", "1 5 6 7\n2\t5  9\n10 3\n")
    assert detect_format(path) == "s3rec"
    assert_log(read_interactions(path), [1, 1, 1, 2, 2, 10], [5, 6, 7, 5, 9, 3], [0, 1, 2, 3, 4, 5])
    # string ids stay strings
    path = write(tmp_path, "names.txt", "u1 a b\nu2 c\n")
    assert_log(read_interactions(path, "s3rec"), ["u1", "u1", "u2"], ["a", "b", "c"], [0, 1, 2])


def test_s3rec_detected_from_any_of_the_first_lines(tmp_path):
    # a first user with a single item looks like `user item`; a later longer line decides
    path = write(tmp_path, "x.txt", "1 5\n2 5 6\n")
    assert detect_format(path) == "s3rec"
    assert len(read_interactions(path)) == 3


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("x.parquet", "parquet"),
        ("x.inter", "recbole"),
        ("u.data", "movielens"),
        ("ratings.dat", "movielens"),
        ("ratings.csv", "movielens"),
        ("x.csv", "csv"),
        ("x.TSV", "tsv"),
        ("x.txt", "sasrec"),
    ],
)
def test_detect_format(tmp_path, name, fmt):
    path = write(tmp_path, name, "1 2\n3 4\n")
    assert detect_format(path) == fmt


def test_detect_format_unknown(tmp_path):
    for name, text in (("x.json", "{}"), ("x.txt", "a,b,c\n")):
        with pytest.raises(DataError, match="fmt="):
            read_interactions(write(tmp_path, name, text))


def test_unknown_fmt_argument(tmp_path):
    with pytest.raises(ValueError, match="sasrec"):
        read_interactions(write(tmp_path, "x.csv", "a\n"), "xml")


# --- errors ------------------------------------------------------------------------------------

HEAD = "user_id,item_id,timestamp\n"
INTER = "user_id:token\titem_id:token\ttimestamp:float\n"


@pytest.mark.parametrize(
    "name, fmt, text, line, what",
    [
        # a blank line before the bad row: line numbers are the file's, not pyarrow's row count
        ("a.csv", "auto", HEAD + "1,2,3\n\n4,5\n", 4, "expected 3 fields, found 2"),
        ("a.csv", "auto", HEAD + "1,2,3\n4,5,6,7\n", 3, "expected 3 fields, found 4"),
        ("a.csv", "auto", HEAD + "1,2,3\n,5,6\n", 3, "empty user id"),
        ("a.csv", "auto", HEAD + "1,2,3\n4, ,6\n", 3, "empty item id"),
        ("a.csv", "auto", HEAD + "1,2,3\n4,5,\n", 3, "unparsable timestamp ''"),
        ("a.csv", "auto", HEAD + "1,2,3\n4,5,6\n7,8,soon\n", 4, "unparsable timestamp 'soon'"),
        ("a.csv", "auto", HEAD + "1,2,3\n4,5,nan\n", 3, "unparsable timestamp"),
        ("a.csv", "auto", HEAD + "1,2,2020-01-01\n4,5,2020-13-01\n", 3, "unparsable timestamp '2020-13-01'"),
        ("a.csv", "auto", "user_id,item_id\n1,2\n", 1, "missing required timestamp column 'when'"),
        ("a.csv", "auto", "who,item_id\n1,2\n", 1, "no user column"),
        ("a.tsv", "auto", "user_id\titem_id\ttimestamp\n1\t2\t3\n1\t2\n", 3, "expected 3 fields, found 2"),
        ("u.data", "auto", "1\t2\t3\t4\n1\t2\t3\n", 2, "expected 4 fields, found 3"),
        ("u.data", "auto", "1\t2\t3\t4\n\n\n1\t2\t3\tx\n", 4, "unparsable timestamp 'x'"),
        ("ratings.dat", "auto", "1::2::3::4\n1::2::3\n", 2, "expected 4 fields, found 3"),
        ("ratings.dat", "auto", "1::2::3::4\n1::2::3::4::5\n", 2, "expected 4 fields, found 5"),
        ("ratings.dat", "auto", "1::2::3::4\n5::6::7::8\n1:x:2::3::4\n", 3, "single ':'"),
        ("ratings.csv", "movielens", "userId,movieId,rating,timestamp\n1,2,3,4\n1,,3,4\n", 3, "empty item id"),
        ("x.inter", "auto", INTER + "1\t2\t3\n1\t2\n", 3, "expected 3 fields, found 2"),
        ("x.inter", "auto", "user_id:token\tmovie:token\n1\t2\n", 1, "no item column"),
        ("x.inter", "auto", "user_id\titem_id\n1\t2\n", 1, "has no ':type'"),
        ("s.txt", "sasrec", "1 2\n3 4\n5 6 7\n", 3, "expected 2 fields"),
        ("s.txt", "sasrec", "1 2\n\n3\n", 3, "expected 2 fields (user item), found 1"),
        ("t.txt", "s3rec", "1 2 3\n2 5 6 7\n\n3\n", 4, "expected a user and at least one item, found 1 fields"),
        ("t.txt", "auto", "1 2 3\n2 5 6 7\n1 8 9\n", 3, "user '1' already has a line (line 1)"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, fmt, text, line, what):
    path = write(tmp_path, name, text)
    time_col = "when" if "'when'" in what else None
    with pytest.raises(DataError) as err:
        read_interactions(path, fmt, time_col=time_col)
    message = str(err.value)
    assert str(path) in message
    assert f"line {line}:" in message
    assert what in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_file(tmp_path, fmt):
    name = {"parquet": "x.parquet", "recbole": "x.inter", "movielens": "u.data", "sasrec": "x.txt"}.get(fmt, "x.csv")
    path = write(tmp_path, name, "")
    with pytest.raises(DataError, match="empty file"):
        read_interactions(path, fmt)


@pytest.mark.parametrize("name, text", [("x.csv", HEAD), ("x.inter", INTER), ("s.txt", "\n\n")])
def test_no_data_rows(tmp_path, name, text):
    fmt = "sasrec" if name.endswith(".txt") else "auto"
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(write(tmp_path, name, text), fmt)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_interactions(tmp_path / "nope.csv")


def test_not_parquet(tmp_path):
    with pytest.raises(DataError, match="x.parquet"):
        read_interactions(write(tmp_path, "x.parquet", "not parquet"))


# --- k-core ------------------------------------------------------------------------------------


def make_log(pairs):
    users, items = zip(*pairs)
    return InteractionLog(np.array(users), np.array(items), np.arange(len(pairs), dtype=np.float64), "test")


def test_kcore_needs_two_rounds():
    # Round 1 drops (u3, c) (c has 1 interaction) and (u4, d); that leaves u3 with 1, so
    # round 2 drops (u3, a). Then u1, u2 have 2 each and a, b have 2 each.
    log = make_log([("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c"), ("u4", "d")])
    out, report = kcore(log, 2, 2)
    assert sorted(zip(out.user, out.item)) == [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b")]
    np.testing.assert_array_equal(out.timestamp, [0, 1, 2, 3])  # rows keep file order
    assert report == KCoreReport(
        k_user=2,
        k_item=2,
        rounds=2,
        users_removed=2,
        items_removed=2,
        interactions_removed=3,
        users_kept=2,
        items_kept=2,
        interactions_kept=4,
    )
    assert "removed 2 users, 2 items, 3 interactions in 2 round(s)" in str(report)


def test_kcore_cascade_to_nothing():
    # A chain u1-a-u2-b-u3: every round peels the ends; with k=2 nothing survives.
    log = make_log([(1, 10), (2, 10), (2, 11), (3, 11)])
    out, report = kcore(log, 2, 2)
    assert len(out) == 0 and report.rounds == 2 and report.interactions_removed == 4


def test_kcore_one_side_only():
    log = make_log([(1, 10), (1, 11), (2, 10), (3, 12)])
    out, report = kcore(log, 2, 0)
    assert out.user.tolist() == [1, 1] and report.rounds == 1
    assert (report.users_removed, report.items_removed) == (2, 1)


def test_kcore_zero_is_no_filter():
    log = make_log([(1, 10), (2, 11)])
    out, report = kcore(log, 0, 0)
    assert out is log and report.rounds == 0 and report.interactions_removed == 0
    assert "no filter" in str(report)
    with pytest.raises(ValueError):
        kcore(log, -1, 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=40),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_kcore_property(pairs, k_user, k_item):
    log = make_log(pairs)
    out, report = kcore(log, k_user, k_item)
    users, counts = np.unique(out.user, return_counts=True)
    assert (counts >= k_user).all()
    assert (np.unique(out.item, return_counts=True)[1] >= k_item).all()
    assert report.interactions_kept == len(out) and report.users_kept == len(users)
    # string ids (the sorting path) give the same result as integer ids (the offset path)
    as_str = InteractionLog(log.user.astype(str), log.item.astype(str), log.timestamp, "test")
    out_str, report_str = kcore(as_str, k_user, k_item)
    assert report_str == report
    np.testing.assert_array_equal(out_str.timestamp, out.timestamp)


def test_a_column_named_twice_is_refused_naming_it(tmp_path):
    path = write(tmp_path, "log.csv", "user_id,item_id,item_id,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError, match=r"log\.csv: line 1: column 'item_id' appears twice in the header"):
        read_interactions(path)
    path = write(tmp_path, "log.tsv", "user_id\titem_id\ttimestamp\ttimestamp\n1\t2\t3\t4\n")
    with pytest.raises(DataError, match="column 'timestamp' appears twice"):
        read_interactions(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array([1]), pa.array([2]), pa.array([3])], names=["user_id", "item_id", "user_id"])
    pq.write_table(table, tmp_path / "log.parquet")
    with pytest.raises(DataError, match="column 'user_id' appears twice"):
        read_interactions(tmp_path / "log.parquet")

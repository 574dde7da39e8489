"""Side-feature files (`--item-features`, `--user-features`): reading, encoding, storage in a version."""

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from attnrec.engine.features import FeatureTables, item_features, load_features, user_features, write_features
from attnrec.engine.repository import (
    ArtifactError,
    DataSection,
    Manifest,
    TrainingSection,
    copy_version,
    newest_valid_version,
    open_version,
)
from attnrec.export.data.features import (
    encode_features,
    feature_tables,
    parse_column_roles,
    read_feature_file,
    summary,
)
from attnrec.export.data.log import DataError

RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Comedy\n"
    "2\tHeat\t1995\tAction Crime\n"
    "3\tCasino\t\tCrime Drama Crime\n"
    "5\tNot In The Log\t1995\tWestern\n"
)
CATALOGUE = np.array([1, 2, 3, 4], dtype=np.int64)  # item 4 has no row; item 5 is not in the log


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def columns(table):
    return {c.name: c for c in table.columns}


def test_recbole_item_file_is_encoded_row_for_token(tmp_path):
    file = read_feature_file(write(tmp_path, "toy.item", RECBOLE_ITEM), kind="item")
    assert file.format == "recbole" and file.id_column == "item_id"
    assert [(c.name, c.role) for c in file.columns] == [
        ("movie_title", "text"),  # typed token_seq, but a title
        ("release_year", "categorical"),  # one distinct number: a category
        ("class", "multi"),
    ]
    table = encode_features(file, CATALOGUE, kind="item", min_count=1)
    assert (table.matched, table.unknown, table.unused) == (3, 1, 1)
    cols = columns(table)
    assert cols["movie_title"].strings.tolist() == ["", "Toy Story", "Heat", "Casino", ""]
    np.testing.assert_array_equal(cols["release_year"].codes, [[0], [1], [1], [0], [0]])
    assert cols["release_year"].vocab == ("", "1995") and cols["release_year"].missing == 1
    genres = cols["class"]
    assert genres.vocab == ("", "Action", "Animation", "Comedy", "Crime", "Drama")
    # row 0 padding, then tokens 1..4; Casino's second "Crime" is kept once; item 4 is unknown
    np.testing.assert_array_equal(genres.codes, [[0, 0], [2, 3], [1, 4], [4, 5], [0, 0]])
    assert genres.codes.dtype == np.int32


def test_values_below_the_min_count_become_unknown(tmp_path):
    file = read_feature_file(write(tmp_path, "toy.item", RECBOLE_ITEM), kind="item")
    genres = columns(encode_features(file, CATALOGUE, kind="item", min_count=2))["class"]
    assert genres.vocab == ("", "Crime") and genres.rare_values == 4 and genres.min_count == 2
    np.testing.assert_array_equal(genres.codes, [[0], [0], [1], [1], [0]])
    # by default items keep every value (a filter must find a one-item brand); users need two rows
    assert columns(encode_features(file, CATALOGUE, kind="item"))["class"].rare_values == 0
    users = read_feature_file(write(tmp_path, "toy.user", RECBOLE_ITEM.replace("item_id", "user_id")), kind="user")
    assert columns(encode_features(users, CATALOGUE, kind="user"))["class"].min_count == 2


def test_csv_with_a_quoted_comma_pipe_separated_genres_and_a_numeric_override(tmp_path):
    path = write(
        tmp_path,
        "items.csv",
        'movieId,title,genres,price,brand\n10,"Toy Story, The",Animation|Comedy,1.5,acme\n'
        "20,Heat,Action,,acme\n30,Casino,Crime| Drama,3,zeta\n",
    )
    file = read_feature_file(path, kind="item", roles=parse_column_roles("price=numeric"))
    assert file.format == "csv" and file.id_column == "movieId"
    assert {c.name: c.role for c in file.columns} == {
        "title": "text",
        "genres": "multi",
        "price": "numeric",
        "brand": "categorical",
    }
    table = encode_features(file, np.array([10, 20, 30, 40]), kind="item", min_count=1, buckets=2)
    cols = columns(table)
    assert cols["title"].strings.tolist() == ["", "Toy Story, The", "Heat", "Casino", ""]
    assert cols["genres"].vocab == ("", "Action", "Animation", "Comedy", "Crime", "Drama")
    np.testing.assert_array_equal(cols["genres"].codes, [[0, 0], [2, 3], [1, 0], [4, 5], [0, 0]])
    price = cols["price"]  # two buckets split at the median of 1.5 and 3; Heat has no price
    assert price.edges == (2.25,) and price.vocab == ("", "[-inf, 2.25)", "[2.25, inf)") and price.missing == 1
    np.testing.assert_array_equal(price.codes, [[0], [1], [0], [2], [0]])
    np.testing.assert_array_equal(cols["brand"].codes, [[0], [1], [1], [2], [0]])


def test_detection_rules_and_overrides(tmp_path):
    rows = [f"{i},Item {i},{1950 + i},{10000 + i},{i % 5},a|b,{'x' if i % 2 else 'y'}" for i in range(1, 26)]
    header = "item_id,name,year,zip_code,rating,tags,colour\n"
    path = write(tmp_path, "items.csv", header + "\n".join(rows) + "\n")
    roles = {c.name: (c.role, c.rule) for c in read_feature_file(path, kind="item").columns}
    assert roles == {
        "name": ("text", "text name"),
        "year": ("numeric", "numbers, 25 distinct"),
        "zip_code": ("categorical", "code name"),  # numbers, but a code
        "rating": ("categorical", "numbers, 5 distinct"),
        "tags": ("multi", "'|'-separated"),
        "colour": ("categorical", "not numbers"),
    }
    given = parse_column_roles("name=categorical, year=drop,zip_code=numeric")
    roles = {c.name: c.role for c in read_feature_file(path, kind="item", roles=given).columns}
    assert roles == {
        "name": "categorical",
        "zip_code": "numeric",
        "rating": "categorical",
        "tags": "multi",
        "colour": "categorical",
    }
    # the id column can be named too, e.g. for a CSV whose ids are called sku
    sku = write(tmp_path, "sku.csv", "sku,colour\n7,red\n8,blue\n")
    assert read_feature_file(sku, kind="item", roles={"sku": "id"}).id_column == "sku"
    for bad, why in (("year", "expected COLUMN=ROLE"), ("year=date", "not one of"), ("a=text,a=drop", "two roles")):
        with pytest.raises(ValueError, match=why):
            parse_column_roles(bad)


def test_a_numeric_column_with_a_few_non_numbers_counts_them_missing_and_says_where(tmp_path, caplog):
    def years_file(name, n):
        years = [str(1900 + i) for i in range(n)]
        years[7] = "unkonwn"  # as in ml-100k.item
        return write(
            tmp_path,
            name,
            "item_id:token\trelease_year:token\n" + "".join(f"{i + 1}\t{y}\n" for i, y in enumerate(years)),
        )

    short, long = years_file("short.item", 30), years_file("long.item", 120)
    assert read_feature_file(short, kind="item").columns[0].role == "categorical"  # 29 of 30 numbers: < 99%
    with caplog.at_level(logging.WARNING):
        file = read_feature_file(long, kind="item")  # 119 of 120: numeric
    assert file.columns[0].role == "numeric"
    assert "1 values are not numbers and count as missing (first: line 9, 'unkonwn')" in caplog.text
    year = columns(encode_features(file, np.arange(1, 121), kind="item", buckets=4))["release_year"]
    assert year.missing == 1 and year.codes[8, 0] == 0 and (year.codes[1:8, 0] == 1).all() and year.codes[120, 0] == 4
    forced = read_feature_file(short, kind="item", roles={"release_year": "numeric"})
    assert np.isnan(forced.columns[0].values[7]) and forced.columns[0].values[8] == 1908


def test_parquet_user_file_with_a_list_column_and_lookup_of_unknown_users(tmp_path):
    path = tmp_path / "users.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": ["u1", "u2", "u3"],
                "gender": ["F", "M", "F"],
                "tags": pa.array([["a", "b"], [], ["b"]], type=pa.list_(pa.string())),
            }
        ),
        path,
    )
    file = read_feature_file(path, kind="user")
    assert file.format == "parquet" and {c.name: c.role for c in file.columns} == {
        "gender": "categorical",
        "tags": "multi",
    }
    table = encode_features(file, np.array(["u1", "u2", "u9"]), kind="user", min_count=1)
    assert (table.matched, table.unknown, table.unused) == (2, 1, 1) and table.ids.tolist() == ["", "u1", "u2", "u9"]
    tables = FeatureTables(user=table)
    got = user_features(tables, ["u2", "nobody", "u1", "u9"])
    np.testing.assert_array_equal(got["gender"], [[2], [0], [1], [0]])  # F=1, M=2; unknown ids: row 0
    np.testing.assert_array_equal(got["tags"], [[0, 0], [0, 0], [1, 2], [0, 0]])
    assert item_features(tables, np.array([1])) == {}


def test_item_lookup_by_tokens_keeps_their_shape_and_refuses_tokens_outside_the_table(tmp_path):
    file = read_feature_file(write(tmp_path, "toy.item", RECBOLE_ITEM), kind="item")
    tables = FeatureTables(item=encode_features(file, CATALOGUE, kind="item", min_count=1))
    got = item_features(tables, np.array([[0, 2], [4, 1]]))  # padding, Heat; unknown item 4, Toy Story
    assert got["class"].shape == (2, 2, 2) and got["movie_title"].tolist() == [["", "Heat"], ["", "Toy Story"]]
    np.testing.assert_array_equal(got["class"][1], [[0, 0], [2, 3]])
    with pytest.raises(ValueError, match="0..4"):
        item_features(tables, np.array([5]))


@pytest.mark.parametrize(
    "text, message",
    [
        ("item_id:token\tclass:token_seq\n1\tAction\n2\tDrama\textra\n", r"line 3: expected 2 fields, found 3"),
        (
            "item_id:token\tclass:token_seq\n1\tAction\n\n2\tDrama\n1\tComedy\n",
            r"line 5: item '1' already has a row \(line 2\)",
        ),
        ("movie:token\tclass:token_seq\n1\tAction\n", r"line 1: no item id column \(looked for item_id"),
        ("item_id:token\tclass\n1\tAction\n", r"line 1: header field 2 'class' is not 'name:type'"),
        ("item_id:token\tclass:token_seq\n1\tAction\n\tDrama\n", r"line 3: empty item id"),
        ("item_id:token\tclass:token_seq\n", r"no data rows"),
    ],
)
def test_malformed_files_name_the_file_and_the_line(tmp_path, text, message):
    path = write(tmp_path, "bad.item", text)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + message):
        read_feature_file(path, kind="item")


def test_csv_errors_name_the_line_too(tmp_path):
    path = write(tmp_path, "bad.csv", 'item_id,title\n1,"A, quoted"\n2,B,C\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: line 3: expected 2 fields, found 3")):
        read_feature_file(path, kind="item")
    with pytest.raises(DataError, match="not found"):
        read_feature_file(tmp_path / "absent.csv", kind="item")


def test_both_files_of_a_run_and_an_override_no_file_has(tmp_path, caplog):
    item = write(tmp_path, "toy.item", RECBOLE_ITEM)
    user = write(tmp_path, "toy.user", "user_id:token\tgender:token\n7\tF\n8\tM\n")
    with caplog.at_level(logging.INFO):
        tables = feature_tables(CATALOGUE, np.array([7, 8, 9]), item_path=item, user_path=user, roles={"class": "drop"})
    assert [c.name for c in tables.item.columns] == ["movie_title", "release_year"]
    assert tables.user.unknown == 1
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("features")]
    assert len(lines) == 2
    assert lines[0].startswith(
        f"item features {item} (recbole, id column item_id): 3 of 4 catalogue items found, 1 unknown"
    )
    assert "movie_title=text (text name)" in lines[0] and "class" not in lines[0]
    assert "1 of" not in lines[1] and "2 of 3 users found, 1 unknown" in lines[1]
    with pytest.raises(DataError, match="'colour', which no feature file has"):
        feature_tables(CATALOGUE, np.array([7]), item_path=item, roles={"colour": "drop"})
    with pytest.raises(ValueError, match="needs --item-features or --user-features"):
        feature_tables(CATALOGUE, np.array([7]), roles={"class": "drop"})


def test_the_train_command_takes_the_feature_flags(tmp_path):
    from attnrec.cli import build_parser

    args = build_parser(["train"]).parse_args(
        ["train", "--data", "x.inter", "--out", "r", "--name", "m", "--item-features", "a.item"]
        + ["--user-features", "b.user", "--feature-columns", "movie_title=text,zip_code=drop"]
    )
    assert (args.item_features, args.user_features) == (Path("a.item"), Path("b.user"))
    assert args.feature_columns == {"movie_title": "text", "zip_code": "drop"}
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(
            ["train", "--data", "x", "--out", "r", "--name", "m", "--feature-columns", "a=b"]
        )


# ── stored in a version ─────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def published(tmp_path_factory, small_split):
    """A version published by `publish` with item and user features. The encoder is untrained: only
    the storage is under test, and training would cost most of this file's time."""
    import torch

    from attnrec.export.config import TrainConfig
    from attnrec.export.model import SASRec
    from attnrec.export.publish import publish

    root = tmp_path_factory.mktemp("features")
    data = small_split.data
    item_ids, user_ids = data.item_ids[1:], data.user_ids
    genres = ["Action", "Drama", "Comedy"]
    item_rows = "".join(f"{i}\t{genres[k % 3]} {genres[(k + 1) % 3]}\t{1900 + k}\n" for k, i in enumerate(item_ids[5:]))
    item = write(root, "s.item", "item_id:token\tclass:token_seq\tyear:float\n" + item_rows)
    user = write(root, "s.csv", "user_id,occupation\n" + "".join(f"{u},{'ab'[u % 2]}\n" for u in user_ids[::2]))
    tables = feature_tables(item_ids, user_ids, item_path=item, user_path=user)
    torch.manual_seed(0)
    model = SASRec(TrainConfig(max_len=10, dim=8, n_blocks=1, n_heads=1, ffn_dim=16).model_config(data.n_items))
    version, manifest, _ = publish(
        model,
        small_split,
        root / "repo",
        "m",
        training=TrainingSection(),
        data=DataSection("synthetic", data.n_users),
        tune_queries=50,
        eval_users=50,
        progress=False,
        features=tables,
    )
    return version, manifest, tables


def test_features_round_trip_through_a_published_version(published, small_split):
    version, manifest, tables = published
    section = manifest.features
    assert manifest.schema_version == "2.4" and section.item.rows == small_split.data.n_items + 1
    assert (section.item.matched, section.item.unknown) == (small_split.data.n_items - 5, 5)
    assert [(c.name, c.role) for c in section.item.columns] == [("class", "multi"), ("year", "numeric")]
    assert section.user.ids is not None and section.user.unknown == small_split.data.n_users // 2
    assert all((version / e.path).is_file() and e.path.startswith("features/") for e in section.roles().values())
    back = load_features(version, open_version(version))
    for want, got in ((tables.item, back.item), (tables.user, back.user)):
        assert [c.name for c in got.columns] == [c.name for c in want.columns]
        for a, b in zip(want.columns, got.columns):
            np.testing.assert_array_equal(a.codes, b.codes)
            assert a.vocab == b.vocab and a.edges == b.edges
    np.testing.assert_array_equal(back.user.ids, tables.user.ids)
    tokens = np.array([[0, 1, 6, small_split.data.n_items]])
    for name, codes in item_features(back, tokens).items():
        assert (codes[0, :2] == 0).all() and (codes[0, 2:] > 0).all(), name  # padding and 5 unknown items
    users = [str(u) for u in small_split.data.user_ids[:2]] + ["not-a-user"]
    occ = user_features(back, users)["occupation"]
    assert occ[0, 0] > 0 and occ[1, 0] == 0 and occ[2, 0] == 0  # every other user is in the file
    # a copy of the version (a new ranker, say) keeps the features
    copy = copy_version(version, version.parent.parent, "m", ranker=None, ranker_file=None)
    assert open_version(copy).features == section


def test_a_tampered_feature_file_is_refused(published, tmp_path):
    version, manifest, _ = published
    repo = tmp_path / "repo"
    shutil.copytree(version.parent, repo / "m")
    good, bad = repo / "m" / "1", repo / "m" / "9"
    shutil.copytree(good, bad)
    npy = bad / manifest.features.item.columns[0].values.path
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 1  # same size, one code changed
    npy.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=re.escape(str(npy)) + ": sha256 .* does not match"):
        open_version(bad)
    with pytest.raises(ArtifactError, match="sha256"):
        load_features(bad, open_version(bad, verify=False))  # checked on its own too
    path, _ = newest_valid_version(repo, "m")  # the server would keep the good version
    assert path.name != "9"


def test_manifest_without_features_reads_as_before_and_features_survive_json(published):
    _, manifest, _ = published
    raw = json.loads(manifest.to_json())
    assert Manifest.from_dict(raw, "mem") == manifest
    raw.pop("features")
    raw["schema_version"] = "2.0"
    old = Manifest.from_dict(raw, "mem")
    assert old.features is None and not load_features("nowhere", old)


def test_write_features_of_nothing_writes_nothing(tmp_path):
    assert write_features(tmp_path, FeatureTables()) is None and not (tmp_path / "features").exists()


def test_summary_line_names_roles_and_counts(tmp_path):
    file = read_feature_file(write(tmp_path, "toy.item", RECBOLE_ITEM), kind="item")
    line = summary(encode_features(file, CATALOGUE, kind="item", min_count=2), file)
    assert line == (
        f"item features {tmp_path / 'toy.item'} (recbole, id column item_id): 3 of 4 catalogue items found, "
        "1 unknown, 1 file rows unused; columns: movie_title=text (text name), release_year=categorical "
        "(numbers, 1 distinct; 1 values; 1 missing), class=multi (token_seq; 1 values; up to 1 per row; "
        "4 rare -> unknown)"
    )


def test_attnrec_train_stores_the_feature_files_in_the_version(tmp_path):
    """The flags reach the published version (a tiny run: one epoch, no ranker)."""
    from attnrec.cli import main
    from attnrec.export.data.synthetic import SyntheticConfig, generate
    from attnrec.export.data.synthetic import write as write_log

    log_ = generate(SyntheticConfig(n_users=60, n_items=40, mean_length=8, seed=1))
    write_log(log_, tmp_path / "log.parquet")
    items = write(
        tmp_path, "items.csv", "item_id,genres\n" + "".join(f"{i},g{i % 3}|h\n" for i in np.unique(log_.item))
    )
    users = write(tmp_path, "users.tsv", "user_id\tage\n1\t20\n2\t30\n")
    flags = ["--epochs", "1", "--dim", "8", "--n-blocks", "1", "--max-len", "10", "--ffn-dim", "16", "--no-ranker"]
    argv = ["-q", "train", "--data", str(tmp_path / "log.parquet"), "--out", str(tmp_path / "repo"), "--name", "m"]
    argv += ["--item-features", str(items), "--user-features", str(users), "--feature-columns", "age=numeric", *flags]
    assert main(argv) == 0
    version, manifest = newest_valid_version(tmp_path / "repo", "m")
    section = manifest.features
    assert section.item.unknown == 0 and [c.name for c in section.item.columns] == ["genres"]
    assert (section.user.matched, section.user.columns[0].role) == (2, "numeric")
    tables = load_features(version, manifest)
    n = manifest.model.n_items
    genres = item_features(tables, np.arange(1, n + 1))["genres"]  # every item: its g value and h
    assert genres.shape == (n, 2) and (genres > 0).all()

"""Business filters as row masks: their semantics over a version's item attributes, and the masked
FAISS search (ID selector inside Flat, IVF and HNSW searches; the over-fetch path) against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from attnrec.engine import index as index_module
from attnrec.engine.errors import InvalidRequest
from attnrec.engine.features import CodedColumn, FeatureTable, TextColumn
from attnrec.engine.index import RowMask
from attnrec.engine.item_filter import ItemAttributes, ItemFilters, parse
from attnrec.engine.pipeline import search
from attnrec.export.index_build import build_index


def table() -> FeatureTable:
    """Four items: colour (categorical), tags (multi, item 3 has none), title (text), size (numeric)."""
    colour = CodedColumn("colour", "categorical", np.array([[0], [1], [2], [1], [0]], np.int32), ("", "red", "blue"))
    tags = CodedColumn(
        "tags", "multi", np.array([[0, 0], [1, 2], [2, 0], [0, 0], [3, 1]], np.int32), ("", "a", "b", "c")
    )
    title = TextColumn("title", np.array(["", "One", "Two", "Three", ""], dtype=object))
    size = CodedColumn("size", "numeric", np.array([[0], [1], [2], [1], [2]], np.int32), ("", "[-inf, 5)", "[5, inf)"))
    return FeatureTable("item", (colour, tags, title, size), "t.csv", "0" * 64, "csv", "item_id", 4, 0, 0)


@pytest.mark.parametrize(
    "include, exclude, kept",
    [
        (["colour=red"], [], [0, 2]),
        (["colour=red", "colour=blue"], [], [0, 1, 2]),
        (["colour="], [], [3]),  # no value
        (["tags=a"], [], [0, 3]),  # multi-valued: any of its values
        (["tags=a", "colour=red"], [], [0]),  # every name must match
        ([], ["tags=b"], [2, 3]),
        ([], ["tags="], [0, 1, 3]),
        (["title=Two", "title=Three"], ["colour=blue"], [2]),
        (["colour=purple"], [], []),  # a value nobody has
        ([], ["colour=purple"], [0, 1, 2, 3]),
    ],
)
def test_attribute_filters_keep_exactly_the_items_the_issue_says(include, exclude, kept):
    allowed = ItemAttributes(table(), 4).allowed(include, exclude)
    assert np.flatnonzero(allowed).tolist() == kept


def test_bad_filters_are_invalid_requests_with_a_message():
    attrs = ItemAttributes(table(), 4)
    with pytest.raises(InvalidRequest, match="unknown item attribute 'brand' \\(the version's: colour, tags"):
        attrs.allowed(["brand=x"], [])
    with pytest.raises(InvalidRequest, match="'size' is numeric"):
        attrs.allowed([], ["size=3"])
    with pytest.raises(InvalidRequest, match="exclude_attributes: expected \"name=value\", got '=x'"):
        parse(["=x"], "exclude_attributes")
    with pytest.raises(InvalidRequest, match="has no item attributes"):
        ItemAttributes(None, 4).allowed(["colour=red"], [])
    assert ItemAttributes(None, 4).allowed([], []) is None


def test_masks_are_cached_and_take_unavailable_items_out():
    filters = ItemFilters(ItemAttributes(table(), 4), {"i0": 0, "i1": 1, "i2": 2, "i3": 3})
    assert filters.mask([], []) is None
    red = filters.mask(["colour=red"], [])
    assert red is filters.mask(["colour=red"], []) and red.allowed.tolist() == [True, False, True, False]
    gone = filters.mask(["colour=red"], [], generation=4, unavailable=frozenset({"i2", "not-here"}))
    assert gone.allowed.tolist() == [True, False, False, False] and gone.count == 1
    assert filters.mask([], [], generation=5, unavailable=frozenset({"i1"})).allowed.tolist() == [
        True,
        False,
        True,
        True,
    ]
    assert filters.mask([], [], generation=6, unavailable=frozenset({"not-here"})) is None


def brute_force(items, queries, k, allowed, exclude):
    scores = queries @ items.T
    scores[:, ~allowed] = -np.inf
    for i, e in enumerate(exclude):
        scores[i, e] = -np.inf
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(scores, rows, axis=1) > -np.inf, rows, -1)


def clustered(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(32, d)).astype(np.float32)
    return (centers[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "HNSW16"])
@pytest.mark.parametrize("share", [0.5, 0.01])  # a broad filter, and one that leaves 1% of the items
def test_masked_search_returns_the_filtered_top_k(factory, share):
    items, queries = clustered(4000, 16), clustered(6, 16, seed=1)
    index = build_index(items, factory)
    if factory.startswith("IVF"):
        index.set_params({"nprobe": 2})  # few lists: a selective filter finds too few in them at first
    rng = np.random.default_rng(2)
    masks = [RowMask(rng.random(4000) < share), None]
    per_query = [masks[i % 2] for i in range(len(queries))]
    exclude = [rng.choice(4000, size=5, replace=False) for _ in queries]
    scores, rows = search(index, queries, 10, exclude=exclude, masks=per_query)
    for i, m in enumerate(per_query):
        allowed = np.ones(4000, bool) if m is None else m.allowed
        want = brute_force(items, queries[i : i + 1], 10, allowed, exclude[i : i + 1])[0]
        got = rows[i]
        assert (got >= 0).sum() == 10 and allowed[got].all() and not np.isin(got, exclude[i]).any()
        exhaustive = factory.startswith("IVF") and m is not None and share < 0.05  # retried over every list
        if factory == "Flat" or exhaustive:
            assert got.tolist() == want.tolist()


def test_the_over_fetch_path_for_indexes_that_cannot_filter_inside_the_search(monkeypatch):
    items, queries = clustered(500, 8), clustered(3, 8, seed=3)
    index = build_index(items, "Flat")
    mask = RowMask(np.arange(500) % 9 == 0)
    want = brute_force(items, queries, 7, mask.allowed, [np.array([], np.int64)] * 3)
    monkeypatch.setattr(index_module, "selector_params", lambda *a, **kw: None)  # as on a GPU index
    assert mask.params(index) is None
    _, rows = search(index, queries, 7, masks=[mask] * 3)
    assert rows.tolist() == want.tolist()


def test_a_mask_that_allows_nothing_or_fewer_than_k():
    items = clustered(100, 8)
    index = build_index(items, "Flat")
    q = items[:1]
    _, rows = search(index, q, 5, masks=[RowMask(np.zeros(100, bool))])
    assert rows.tolist() == [[-1] * 5]
    few = np.zeros(100, bool)
    few[[3, 50]] = True
    scores, rows = search(index, q, 5, masks=[RowMask(few)])
    assert (
        sorted(rows[0][:2].tolist()) == [3, 50] and rows[0][2:].tolist() == [-1] * 3 and np.isinf(scores[0][2:]).all()
    )


def test_a_brand_only_one_item_has_is_filtered_from_a_real_feature_file(tmp_path):
    """Encoded from a file with defaults, a value on a single item keeps its code, so a filter on
    it removes (or keeps) exactly that item rather than silently matching nothing."""
    from attnrec.export.data.features import encode_features, read_feature_file

    (tmp_path / "items.csv").write_text("item_id,brand\n1,acme\n2,acme\n3,solo\n4,acme\n")
    table = encode_features(read_feature_file(tmp_path / "items.csv", kind="item"), np.arange(1, 5), kind="item")
    attrs = ItemAttributes(table, 4)
    assert np.flatnonzero(attrs.allowed([], ["brand=solo"])).tolist() == [0, 1, 3]
    assert np.flatnonzero(attrs.allowed(["brand=solo"], [])).tolist() == [2]

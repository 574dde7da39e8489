"""Business filters and availability as the rows a search may return (a `RowMask`, engine/index.py).

Filters are "name=value" strings over the item attributes the version stores (its item feature
table, `attnrec train --item-features`; engine/features.py). An item is kept when, for every
attribute name in `include`, its value is one of those listed, and it matches none of `exclude`.
A multi-valued attribute matches a value when any of the item's values is that value; "name="
matches items with no value. Categorical, multi-valued and text attributes can be filtered;
numeric ones are stored as quantile buckets, not values, and are refused, as are names the
version's items lack (InvalidRequest: INVALID_ARGUMENT). Values are compared as stored: a value
that training's minimum count turned into "unknown" (seen on a single item) matches no item.

Unavailable item ids (engine/online_state.py) are taken out of the same mask. Masks are cached per
version by (include, exclude, availability generation): requests repeat a few filters, and a
cached mask also keeps its FAISS selector and search parameters.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np

from .errors import InvalidRequest
from .features import CodedColumn, FeatureTable, TextColumn
from .index import RowMask

CACHE_SIZE = 256


def parse(specs: Sequence[str], field: str) -> dict[str, set[str]]:
    """["genre=Drama", "genre=Comedy", "brand="] → {"genre": {"Drama", "Comedy"}, "brand": {""}}."""
    out: dict[str, set[str]] = {}
    for spec in specs:
        name, eq, value = spec.partition("=")
        if not eq or not name:
            raise InvalidRequest(f'{field}: expected "name=value", got {spec!r}')
        out.setdefault(name, set()).add(value)
    return out


class ItemAttributes:
    """A version's item attribute table as per-value row masks (row r = catalogue row r)."""

    def __init__(self, table: FeatureTable | None, n_items: int) -> None:
        self.n_items = n_items
        self.columns = {c.name: c for c in table.columns} if table is not None else {}

    def _column(self, name: str, field: str) -> CodedColumn | TextColumn:
        column = self.columns.get(name)
        if column is None:
            if not self.columns:
                raise InvalidRequest(
                    f"{field}: this version has no item attributes (train with --item-features), "
                    f"so {name!r} cannot be filtered on"
                )
            raise InvalidRequest(f"{field}: unknown item attribute {name!r} (the version's: {', '.join(self.columns)})")
        if column.role == "numeric":
            raise InvalidRequest(
                f"{field}: item attribute {name!r} is numeric, stored as quantile buckets: filters compare "
                "categorical, multi-valued and text attributes"
            )
        return column

    def matching(self, name: str, values: set[str], field: str) -> np.ndarray:
        """(n_items,) bool: the items whose `name` is one of `values`."""
        column = self._column(name, field)
        if isinstance(column, TextColumn):
            return np.isin(column.strings[1:], list(values))
        codes = column.codes[1:]  # row 0 is the unknown row
        code_of = {v: i for i, v in enumerate(column.vocab) if i}
        wanted = [code_of[v] for v in values if v in code_of]
        hit = np.isin(codes, wanted).any(axis=1) if wanted else np.zeros(self.n_items, dtype=bool)
        if "" in values:  # no value: every slot is padding
            hit |= (codes == 0).all(axis=1)
        return hit

    def allowed(self, include: Sequence[str], exclude: Sequence[str]) -> np.ndarray | None:
        """(n_items,) bool of the rows the filters keep; None when there are no filters."""
        inc, exc = parse(include, "include_attributes"), parse(exclude, "exclude_attributes")
        if not inc and not exc:
            return None
        keep = np.ones(self.n_items, dtype=bool)
        for name, values in inc.items():
            keep &= self.matching(name, values, "include_attributes")
        for name, values in exc.items():
            keep &= ~self.matching(name, values, "exclude_attributes")
        return keep


class ItemFilters:
    """Filters and availability → RowMask for one version, cached (see the module docstring)."""

    def __init__(self, attributes: ItemAttributes, rows_by_key: Mapping[str, int]) -> None:
        self.attributes, self.rows_by_key = attributes, rows_by_key
        self._masks: OrderedDict[tuple, RowMask | None] = OrderedDict()
        self._unavailable: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    @property
    def names(self) -> list[str]:
        return list(self.attributes.columns)

    def unavailable_rows(self, generation: int, items: frozenset[str]) -> np.ndarray:
        """The catalogue rows of the unavailable ids (ids this version lacks are ignored)."""
        if self._unavailable[0] != generation:
            rows = [self.rows_by_key[x] for x in items if x in self.rows_by_key]
            self._unavailable = (generation, np.array(sorted(rows), dtype=np.int64))
        return self._unavailable[1]

    def mask(
        self, include: Sequence[str], exclude: Sequence[str], generation: int = 0, unavailable: frozenset[str] = ()
    ) -> RowMask | None:
        """The rows a request may get; None when every row is allowed (no filter, nothing unavailable)."""
        if not include and not exclude and not unavailable:
            return None
        key = (tuple(include), tuple(exclude), generation if unavailable else 0)
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key]
        allowed = self.attributes.allowed(include, exclude)  # InvalidRequest before anything is cached
        gone = self.unavailable_rows(generation, unavailable) if unavailable else ()
        if len(gone):
            allowed = np.ones(self.attributes.n_items, dtype=bool) if allowed is None else allowed.copy()
            allowed[gone] = False
        mask = None if allowed is None or allowed.all() else RowMask(allowed)
        self._masks[key] = mask
        if len(self._masks) > CACHE_SIZE:
            self._masks.popitem(last=False)
        return mask

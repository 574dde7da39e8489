"""The ONNX ranker: a user's history and N candidates in, one score per candidate out.

The graph declares which of these inputs it reads (all batch-major, padded like the encoder's):

    history           int64   (B, L)     history tokens (catalogue row + 1), left-padded with 0
    hidden            float32 (B, L, D)  the encoder's per-position states for those tokens
    candidates        int64   (B, N)     candidate tokens; 0 marks an empty slot
    candidate_scores  float32 (B, N)     stage one's inner-product score of each candidate
    user_features     int64   (B, W)     optional: the user's side-feature codes, every coded column
                                         of the version's user table side by side (`user_feature_codes`);
                                         absent = all 0 = unknown, which is what serving sends until
                                         requests carry a user id
    history_timestamps int64  (B, L)    optional: seconds (Unix time) of each `history` position,
                                         aligned with it; ≤ 0 = unknown (padding, or an event without
                                         a time); absent = all unknown
    request_time      int64   (B, 1)     optional: the request's time in seconds, from which the
                                         history's ages, the hour of day and the day of week (UTC)
                                         are computed; ≤ 0 or absent = unknown, and then every time
                                         feature is unknown (the ranker's "unknown time" path)

and answers `scores` float32 (B, N), higher is better. A ranker that reads `hidden` needs an
encoder exported with its hidden states; `Pipeline` checks that when it loads a version. Item
side features need no input: the exporter bakes them into the graph, indexed by token.
Scoring is request-time compute: engine/pipeline.py (`score`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .encoder import binding_device, make_session
from .features import CodedColumn, FeatureTable, FeatureTables, user_features

RANKER_INPUTS = (
    "history",
    "hidden",
    "candidates",
    "candidate_scores",
    "user_features",
    "history_timestamps",
    "request_time",
)
# A caller may leave these out: `OnnxRanker.default` fills them with "unknown".
OPTIONAL_INPUTS = ("user_features", "history_timestamps", "request_time")
TIME_INPUTS = ("history_timestamps", "request_time")  # a ranker reads both or neither


def coded_matrix(table: FeatureTable | None, rows: np.ndarray | None = None) -> np.ndarray:
    """The table's coded columns side by side, int64 (rows, W) (all rows, or `rows`): the layout of
    `user_features` and of the item codes the exporter bakes. Text columns are left out."""
    if table is None:
        return np.zeros((0 if rows is None else len(rows), 0), dtype=np.int64)
    cols = [c.codes if rows is None else c.codes[rows] for c in table.columns if isinstance(c, CodedColumn)]
    n = table.rows if rows is None else len(rows)
    return np.concatenate(cols, axis=1).astype(np.int64) if cols else np.zeros((n, 0), dtype=np.int64)


def user_feature_codes(tables: FeatureTables, user_ids: list[str]) -> np.ndarray:
    """`user_features` of external user ids (B, W); an id the version does not know gets the unknown row."""
    if tables.user is None:
        raise ValueError("the version has no user features")
    codes = user_features(tables, user_ids)  # checks the ids and maps unknown ones to row 0
    cols = [codes[c.name] for c in tables.user.columns if isinstance(c, CodedColumn)]
    return np.concatenate(cols, axis=1).astype(np.int64) if cols else np.zeros((len(user_ids), 0), np.int64)


class OnnxRanker:
    def __init__(self, path: Path | str, *, io_binding: str = "auto", **session_kwargs) -> None:
        self.session = make_session(path, **session_kwargs)
        self.binding = binding_device(self.session, io_binding)  # None: session.run
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = [n for n in self.input_names if n not in RANKER_INPUTS]
        if unknown:
            raise ValueError(f"{path}: ranker inputs {unknown} are not among {RANKER_INPUTS}")
        if "candidates" not in self.input_names:
            raise ValueError(f"{path}: a ranker must read `candidates`")

        self.user_width = 0
        for i in self.session.get_inputs():
            if i.name == "user_features":
                if len(i.shape) != 2 or not isinstance(i.shape[1], int):
                    raise ValueError(f"{path}: `user_features` must be (batch, W) with a fixed W, got {i.shape}")
                self.user_width = i.shape[1]
        if len({n in self.input_names for n in TIME_INPUTS}) > 1:
            raise ValueError(f"{path}: a ranker reads both of {TIME_INPUTS} or neither")
        self.reads_time = "request_time" in self.input_names
        # What an optional input left out is: zeros (unknown) of these shapes, "batch" and "length" (the
        # history's) resolved per call. Plain data, so the request path reads it without a call here.
        shapes = {"user_features": ("batch", self.user_width), "history_timestamps": ("batch", "length")}
        shapes["request_time"] = ("batch", 1)
        self.unknown_shapes = {n: shapes[n] for n in self.input_names if n in OPTIONAL_INPUTS}

    @property
    def needs_hidden(self) -> bool:
        return "hidden" in self.input_names

    @property
    def reads_user_features(self) -> bool:
        return "user_features" in self.input_names

    def default(self, name: str, batch: int, length: int = 0) -> np.ndarray:
        """The value of an optional input a caller left out: unknown for every row (`length`: the
        history's, for `history_timestamps`)."""
        if name not in self.unknown_shapes:
            raise ValueError(f"ranker input {name!r} is required")
        sizes = {"batch": batch, "length": length}
        return np.zeros(tuple(sizes.get(d, d) for d in self.unknown_shapes[name]), dtype=np.int64)

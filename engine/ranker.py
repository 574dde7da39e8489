"""The ONNX ranker: a user's history and N candidates in, one score per candidate out.

The graph declares which of these inputs it reads (all batch-major, padded like the encoder's):

    history           int64   (B, L)     history tokens (catalogue row + 1), left-padded with 0
    hidden            float32 (B, L, D)  the encoder's per-position states for those tokens
    candidates        int64   (B, N)     candidate tokens; 0 marks an empty slot
    candidate_scores  float32 (B, N)     stage one's inner-product score of each candidate

and answers `scores` float32 (B, N), higher is better. A ranker that reads `hidden` needs an
encoder exported with its hidden states; `Pipeline` checks that when it loads a version.
Scoring is request-time compute: engine/pipeline.py (`score`).
"""

from __future__ import annotations

from pathlib import Path

from .encoder import binding_device, make_session

RANKER_INPUTS = ("history", "hidden", "candidates", "candidate_scores")


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

    @property
    def needs_hidden(self) -> bool:
        return "hidden" in self.input_names

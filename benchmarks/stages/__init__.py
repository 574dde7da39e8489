"""Benchmark stages: each module here is one stage, named by its file, and fills one report Section.

A stage module holds

    TITLE: str                                            # the section's heading
    def run(settings: Settings, section: Section) -> None # measures, then adds notes/tables/data/figures

and imports its heavy libraries inside `run`, so listing stages stays cheap. A new stage
(end-to-end over gRPC, a peer server) is a new file here; ORDER only fixes where it runs.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

ORDER = ("model", "retrieval", "e2e", "peer")  # known stages run in this order, others after them


def available() -> list[str]:
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def load(name: str) -> ModuleType:
    if name not in available():
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(available())}")
    module = importlib.import_module(f"{__name__}.{name}")
    for attr in ("TITLE", "run"):
        if not hasattr(module, attr):
            raise TypeError(f"stage module {module.__name__} has no {attr}")
    return module

"""attnrec: attention-based recommenders trained with PyTorch and served by onnxruntime + FAISS.

One import package. Its halves live in the repository's top-level folders (mapped by
pyproject.toml's package-dir): `attnrec.engine` (engine/, serving, no torch), `attnrec.export`
(export/, data, training, export) and `attnrec.benchmarks` (benchmarks/). See docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnrec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

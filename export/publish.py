"""Turning a trained model into a new model-repository version: ONNX encoder (verified),
item vectors, tuned FAISS index, id map, popularity, optionally the second-stage ranker
(trained on this very encoder and index, ONNX-verified), side features, content embeddings with the
cold items' content-mapped vectors, evaluation — published atomically."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import platform
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnxruntime as ort
import torch

from attnrec.engine.content import ItemContent, write_content
from attnrec.engine.encoder import OnnxEncoder
from attnrec.engine.features import FeatureTables, write_features
from attnrec.engine.pipeline import Pipeline, encode, encode_histories
from attnrec.engine.ranker import OnnxRanker
from attnrec.engine.repository import (
    DataSection,
    EncoderParity,
    EncoderSection,
    EncoderSpeed,
    IndexSection,
    Manifest,
    ModelSection,
    RankerParity,
    RankerSection,
    RankerTraining,
    TensorEntry,
    TrainingSection,
    VersionWriter,
    open_version,
)

from .config import FEATURE_GROUPS, RankerConfig
from .data.sequences import LeaveOneOut
from .evaluate import evaluate_pipeline, metrics_section
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
    training: TrainingSection,
    data: DataSection,
    index_factory: str | None = None,
    recall_n: int = 200,
    target_recall: float = 0.98,
    tune_queries: int = 2000,
    eval_users: int = 0,
    with_hidden: bool = False,
    ranker: RankerConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    features: FeatureTables | None = None,
    content: ItemContent | None = None,
) -> tuple[Path, Manifest, dict[str, Any]]:
    """`ranker`: train, verify and ship a second stage with these settings (with keys="hidden"
    the encoder also outputs its hidden states, which that ranker reads; with `holdout` a second
    encoder is trained with `training.config` for its samples, and with serve_encoder="holdout" it
    is the one published). `features`: side-feature tables encoded against `split`
    (attnrec.export.data.features), stored in the version and read by the ranker. `content`: item
    content embeddings on `split`'s catalogue (attnrec.export.content), stored in the version; items
    with text and no training interaction get content-mapped vectors (attnrec.export.cold_start) in
    the encoder, the item vectors and the index. `training` gets the library versions added.
    Returns the version folder, its manifest and the evaluation report."""
    model = model.eval()
    rng = np.random.default_rng(seed)
    with_hidden = with_hidden or (ranker is not None and ranker.keys == "hidden")
    features = features or FeatureTables()
    for table, rows in ((features.item, split.data.n_items), (features.user, split.data.n_users)):
        if table is not None and table.rows != rows + 1:
            raise ValueError(f"{table.kind} features have {table.rows} rows, this split {rows} + 1: encode them on it")
    held = None
    if ranker is not None:
        check_ranker_config(ranker)
        if ranker.holdout > 0:
            held = _holdout_encoder(split, training, ranker.holdout, progress)
            if ranker.serve_encoder == "holdout":
                model = held[1]
    cold_start = None
    if content is not None:
        from .cold_start import apply_cold_start

        model, cold_start = apply_cold_start(model, split, content, seed=seed)
    cfg = model.cfg
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
        queries = encode_histories(encoder, [split.valid.history(j) for j in np.sort(tq)])
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

        files = {
            "encoder": "encoder.onnx",
            "item_embeddings": "item_embeddings.npy",
            "index": "items.faiss",
            "item_ids": "item_ids.json",
            "item_popularity": "item_popularity.npy",
        }
        ranker_section = onnx_ranker = None
        if ranker is not None:
            ranker_section = _ship_ranker(
                model,
                encoder,
                split,
                index,
                vectors,
                ranker,
                w.path / "ranker.onnx",
                held=held,
                features=features,
                training=training,
                progress=progress,
            )
            files["ranker"] = "ranker.onnx"
            onnx_ranker = OnnxRanker(w.path / "ranker.onnx")

        # Evaluate the staged version through the serving pipeline, before it is published.
        staged = Pipeline(
            encoder,
            index,
            np.asarray(ids),
            popularity,
            onnx_ranker,
            n_candidates=ranker_section.n_candidates if ranker_section is not None else 0,
            features=features,
            item_vectors=vectors,
        )
        metrics = evaluate_pipeline(
            staged,
            vectors,
            split,
            max_users=eval_users,
            seed=seed,
            progress=progress,
        )
        features_section = write_features(w.path, features)
        content_section = write_content(w.path, content, cold_start) if content is not None else None
        version_dir = w.commit(
            files=files,
            model=ModelSection(type="sasrec", **cfg.to_dict()),
            encoder=EncoderSection(
                inputs={
                    "history": TensorEntry(
                        "int64",
                        ("batch", "length"),
                        "tokens = catalogue row + 1, left-padded with 0, length <= max_len",
                    )
                },
                outputs={
                    "query": TensorEntry("float32", ("batch", cfg.dim)),
                    **({"hidden": TensorEntry("float32", ("batch", "length", cfg.dim))} if with_hidden else {}),
                },
                opset=OPSET,
                parity=EncoderParity(
                    max_abs_diff=parity.max_abs_diff,
                    by_length={str(n): d for n, d in parity.by_length.items()},
                    histories=parity.n_histories,
                    tolerance=1e-4,
                ),
                speed_cpu=EncoderSpeed(**speed),
            ),
            index=IndexSection(
                factory=factory,
                metric="inner_product",
                params=tuned.params,
                mips_max_norm2=index.mips_max_norm2,
                recall_n=tuned.n,
                recall=tuned.recall,
                target_recall=target_recall,
                reached_target=tuned.reached_target,
                search_ms=tuned.search_ms,
                exact_search_ms=tuned.exact_ms,
                batch_ms_per_query=tuned.batch_ms_per_query,
                tuning_queries=len(queries),
                tried=tuple(tuned.tried),
            ),
            metrics=metrics_section(metrics),
            ranker=ranker_section,
            training=dataclasses.replace(
                training,
                torch=torch.__version__,
                onnxruntime=ort.__version__,
                faiss=faiss.__version__,
                python=platform.python_version(),
            ),
            data=data,
            features=features_section,
            content=content_section,
        )
    return version_dir, open_version(version_dir), metrics


def check_ranker_config(cfg: RankerConfig) -> None:
    if cfg.holdout < 0:
        raise ValueError(f"ranker holdout must be >= 0, got {cfg.holdout}")
    if cfg.serve_encoder not in ("full", "holdout"):
        raise ValueError(f"ranker serve_encoder must be full or holdout, got {cfg.serve_encoder!r}")
    if cfg.serve_encoder == "holdout" and not cfg.holdout:
        raise ValueError("serving the hold-out encoder needs a holdout of at least 1")
    unknown = set(feature_groups(cfg)) - set(FEATURE_GROUPS)
    if unknown:
        raise ValueError(f"ranker features {sorted(unknown)} are not among {FEATURE_GROUPS}")
    if "trend" in feature_groups(cfg) and "time" not in feature_groups(cfg):
        raise ValueError("ranker feature group trend reads the request time: it needs the time group too")


def feature_groups(cfg: RankerConfig) -> list[str]:
    return [g.strip() for g in cfg.features.split(",") if g.strip() and g.strip() != "none"]


def _holdout_encoder(
    split: LeaveOneOut, training: TrainingSection, r: int, progress: bool
) -> tuple[LeaveOneOut, SASRec]:
    """The ranker's stage one for leak-free samples: the same training settings on `split` less each
    user's last r training interactions (validation and test untouched)."""
    from .config import TrainConfig
    from .data.sequences import hold_out_last
    from .train import train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in training.config.items() if k in names})
    held = hold_out_last(split, r)
    result = train(held, tcfg, progress=progress)
    log.info(
        "hold-out encoder (each user's last %d training interactions left out): valid NDCG@10 %.4f at epoch %d, %.0fs",
        r,
        result.best_valid_ndcg10,
        result.best_epoch,
        result.seconds,
    )
    return held, result.model.eval()


def _auto_holdout(
    split: LeaveOneOut, served, cfg: RankerConfig, training: TrainingSection, progress: bool
) -> tuple[tuple[LeaveOneOut, SASRec] | None, dict]:
    """RankerConfig.holdout_auto: measure how much the served stage one memorised its training targets, and
    train the hold-out encoder (each user's last training interaction left out) when it did."""
    from .ranker_train import memorisation

    m = memorisation(split, served, cfg, seed=cfg.seed)
    chosen = m.ratio >= cfg.holdout_auto
    log.info(
        "ranker samples: stage one retrieves %.1f%% of its own training targets in its top-%d and %.1f%% of "
        "validation targets (%.2fx; --ranker-holdout-auto %.2f): %s",
        100 * m.train_recall,
        cfg.n_candidates,
        100 * m.valid_recall,
        m.ratio,
        cfg.holdout_auto,
        "memorised, so the samples are held-out interactions of a second encoder (as --ranker-holdout 1)"
        if chosen
        else "recent training prefixes",
    )
    record = {
        "train_recall": round(m.train_recall, 4),
        "valid_recall": round(m.valid_recall, 4),
        "ratio": round(m.ratio, 3),
        "train_users": m.train_users,
        "valid_users": m.valid_users,
        "holdout": 1 if chosen else 0,
    }
    return (_holdout_encoder(split, training, 1, progress) if chosen else None), record


def ranker_stage_one(model: SASRec, index_factory: str | None = None):
    """A torch encoder with an index over its own items: the candidates of a stage one that is not served
    (`index_factory` None: the default for the catalogue, untuned)."""
    from .ranker_train import StageOne, torch_encode

    vectors = np.ascontiguousarray(model.item_vectors().detach().numpy(), dtype=np.float32)
    index = build_index(vectors, index_factory or default_factory(len(vectors)))
    return StageOne(torch_encode(model), model.cfg.max_len, index, vectors)


def _ship_ranker(
    model: SASRec,
    encoder: OnnxEncoder,
    split: LeaveOneOut,
    index,
    vectors: np.ndarray,
    cfg: RankerConfig,
    path: Path,
    *,
    held: tuple[LeaveOneOut, SASRec] | None = None,
    features: FeatureTables = FeatureTables(),
    training: TrainingSection | None = None,
    progress: bool = True,
) -> RankerSection:
    """Train the ranker on the exported encoder's and the index's own candidates and hidden
    states (what the server computes) — or, with `held`, on the hold-out encoder's candidates for
    the interactions it left out — export and verify it; the manifest's `ranker` section. Without
    `held`, `cfg.holdout_auto` may train a hold-out encoder (with `training`'s settings) here."""
    from dataclasses import asdict

    from attnrec.engine.ranker import coded_matrix

    from . import trend
    from .ease import MAX_ITEMS
    from .ranker_export import check_ranker_parity, export_ranker, time_ranker
    from .ranker_model import RankerShape, coded_columns
    from .ranker_model import features as describe
    from .ranker_train import StageOne, train_ranker, trend_table

    groups = feature_groups(cfg)
    item_table = features.item if "item" in groups else None
    user_table = features.user if "user" in groups else None
    timed = "time" in groups and split.data.timed
    if "time" in groups and not timed:
        log.warning("ranker: no time features (the log has no timestamp column; its row order is its time order)")
    trending = "trend" in groups and timed
    if "trend" in groups and not trending:
        log.warning("ranker: no trend features (the log has no timestamp column)")
    table = trend_table(split) if trending else None
    cf = "cf" in groups and cfg.cf_neighbours > 0 and model.cfg.n_items <= MAX_ITEMS
    if "cf" in groups and not cf:
        log.warning(
            "ranker: no cf feature (--ranker-cf-neighbours %d; %d items, EASE's limit is %d)",
            cfg.cf_neighbours,
            model.cfg.n_items,
            MAX_ITEMS,
        )
    shape = RankerShape(
        model.cfg.n_items,
        model.cfg.dim,
        attend_last=cfg.attend_last,
        keys=cfg.keys,
        mlp_dim=cfg.mlp_dim,
        dropout=cfg.dropout,
        item_columns=coded_columns(item_table),
        user_columns=coded_columns(user_table),
        feature_dim=cfg.feature_dim,
        feature_dropout=cfg.feature_dropout,
        time=timed,
        cross_dim=cfg.cross_dim,
        cf_neighbours=min(cfg.cf_neighbours, model.cfg.n_items) if cf else 0,
        trend_features=trend.n_features(table) if trending else 0,
    )
    served = StageOne(functools.partial(encode, encoder), model.cfg.max_len, index, vectors)
    memorised = None
    if held is None and cfg.holdout == 0 and cfg.holdout_auto > 0 and training is not None:
        held, memorised = _auto_holdout(split, served, cfg, training, progress)
    holdout = None
    if held is not None:
        hsplit, hmodel = held
        # Serving the hold-out encoder: its own exported stage one gives the samples too.
        holdout = (
            hsplit,
            served if hmodel is model else ranker_stage_one(hmodel, "Flat" if model.cfg.n_items <= 50_000 else None),
        )
    result = train_ranker(
        split,
        served.encode,
        served.max_len,
        index,
        vectors,
        cfg,
        shape,
        holdout=holdout,
        item_codes=coded_matrix(item_table) if shape.item_columns else None,
        user_codes=coded_matrix(user_table) if shape.user_columns else None,
        trend=table,
    )
    log.info(
        "ranker: best valid NDCG@10 %.4f at epoch %d (stage one %.4f), %d epochs, %.0fs",
        result.best_valid_ndcg10,
        result.best_epoch,
        result.stage1_valid_ndcg10,
        result.epochs_run,
        result.seconds,
    )
    shape = result.ranker.shape  # with what training chose (EASE's lambda)
    names = export_ranker(result.ranker, path)
    real = [split.valid.history(j) for j in range(min(64, len(split.valid)))]
    parity = check_ranker_parity(result.ranker, model, path, real, seed=cfg.seed)
    log.info("ranker ONNX parity: max |onnx - torch| = %.2e", parity.max_abs_diff)
    speed = [time_ranker(path, shape.n_items, shape.dim, length=200, n=200, batch=b) for b in (1, 64)]
    log.info(
        "ranker, 200 candidates x history 200: %.3f ms at batch 1, %.0f users/s at batch 64",
        speed[0]["ms"],
        speed[1]["users_per_s"],
    )
    inputs = {
        "history": TensorEntry("int64", ("batch", "length"), "tokens, left-padded with 0"),
        "hidden": TensorEntry("float32", ("batch", "length", shape.dim)),
        "candidates": TensorEntry("int64", ("batch", "candidates"), "row + 1; 0 = empty slot"),
        "candidate_scores": TensorEntry("float32", ("batch", "candidates")),
        "user_features": TensorEntry(
            "int64", ("batch", shape.user_width), "optional: the user's feature codes (engine/ranker.py); 0 = unknown"
        ),
        "history_timestamps": TensorEntry(
            "int64", ("batch", "length"), "optional: seconds of each history position; <= 0 = unknown"
        ),
        "request_time": TensorEntry("int64", ("batch", 1), "optional: the request's time in seconds; <= 0 = unknown"),
    }
    return RankerSection(
        type="target_attention",
        n_candidates=cfg.n_candidates,
        inputs={name: spec for name, spec in inputs.items() if name in names},
        outputs={"scores": TensorEntry("float32", ("batch", "candidates"))},
        features=tuple(describe(shape)),
        shape=shape.to_dict(),
        opset=OPSET,
        parity=RankerParity(max_abs_diff=parity.max_abs_diff, cases=tuple(parity.cases), tolerance=1e-4),
        speed_cpu=tuple(speed),
        training=RankerTraining(
            config=asdict(cfg),
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            best_valid_ndcg10=result.best_valid_ndcg10,
            stage1_valid_ndcg10=result.stage1_valid_ndcg10,
            samples=result.samples,
            samples_target_retrieved=result.samples_target_retrieved,
            seconds=result.seconds,
            history=tuple(result.history),
            valid_gain_z=result.valid_gain_z,
            rejected_epoch=result.rejected_epoch,
            memorisation=memorised,
        ),
    )

"""Federated against centralised training: validation and test NDCG@10 round by round.

    python -m attnrec.benchmarks.federated_curve --data LOG [--clients 4,8] [--rounds 20] [--local-epochs 1]
        [--seed 0] [--label ml-100k] [--out benchmarks/results] [--date YYYY-MM-DD] [-- TRAIN FLAGS]

For each K in --clients: export/federated.py's `train_federated` (what `attnrec train --federated K`
runs: Flower FedAvg over K clients holding disjoint users, grpc-bidi on 127.0.0.1), the aggregate
scored after every round on the validation users (as training does) and on every test user (exact
full ranking, seen items excluded). Beside it, centralised training (`attnrec train`'s `train`) with
the same settings and the same number of passes over the data (rounds x local epochs epochs, early
stopping off), its validation NDCG@10 per epoch and the test NDCG@10 of its best epoch, and the
popularity ranking. Writes `federated-<label>-<date>.md`, `.json` and `.png` into `--out`. Trailing
flags are `attnrec train`'s model/training flags (e.g. --max-len 50 --dim 64).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from .report import add_curve_args, run_curve


def _train_config(train_flags: list[str]):
    from attnrec.export.cli.train import _add_train_args, _train_config

    p = argparse.ArgumentParser(prog="train flags")
    _add_train_args(p)
    return _train_config(p.parse_args(train_flags))


def measure(
    data: Path, clients: list[int], rounds: int, local_epochs: int, seed: int, train_flags: list[str], quiet: bool
) -> dict:
    from attnrec.export.data.readers import read_interactions
    from attnrec.export.data.sequences import build_sequences, leave_one_out
    from attnrec.export.evaluate import evaluate_query_fn
    from attnrec.export.federated import FederatedConfig, train_federated
    from attnrec.export.train import train, validate

    split = leave_one_out(build_sequences(read_interactions(data)))
    cfg = dataclasses.replace(_train_config(train_flags), seed=seed)
    pop = split.train_popularity()[1:].astype(np.float64)
    everyone = np.arange(len(split.test))

    t0 = time.perf_counter()
    epochs = rounds * local_epochs  # the same passes over the data as R rounds of E local epochs
    central = train(split, dataclasses.replace(cfg, epochs=epochs, patience=epochs), progress=not quiet)
    central_test = validate(central.model, split, everyone, pop, which="test")
    centralised = {
        "epochs": epochs,
        "best_epoch": central.best_epoch,
        "best_valid_ndcg@10": central.best_valid_ndcg10,
        "test": central_test,
        "history": central.history,
        "config": dataclasses.asdict(central.config),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"[federated] centralised, {epochs} epochs: best valid NDCG@10 {central.best_valid_ndcg10:.4f} at epoch "
        f"{central.best_epoch}, test NDCG@10 {central_test['ndcg@10']:.4f} ({centralised['seconds']:.0f}s)",
        flush=True,
    )
    runs = []
    for k in clients:
        t0 = time.perf_counter()
        tests: dict[int, dict] = {}

        def score_test(r, model, _weights, tests=tests):
            if r > 0:
                tests[r] = validate(model, split, everyone, pop, which="test")

        result, section = train_federated(
            split,
            cfg,
            FederatedConfig(clients=k, rounds=rounds, local_epochs=local_epochs),
            progress=not quiet,
            on_round=score_test,
        )
        curve = [
            {**h, "test_ndcg@10": tests[h["round"]]["ndcg@10"], "test_hr@10": tests[h["round"]]["hr@10"]}
            for h in result.history
        ]
        best = next(p for p in curve if p["round"] == section.best_round)
        runs.append(
            {
                "clients": k,
                "curve": curve,
                "best_round": section.best_round,
                "best_valid_ndcg@10": result.best_valid_ndcg10,
                "test_at_best_round": {"ndcg@10": best["test_ndcg@10"], "hr@10": best["test_hr@10"]},
                "federated": section.to_dict(),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"[federated] K = {k}, {rounds} rounds x {local_epochs} local epochs: best valid NDCG@10 "
            f"{result.best_valid_ndcg10:.4f} at round {section.best_round}, test NDCG@10 there "
            f"{best['test_ndcg@10']:.4f} ({runs[-1]['seconds']:.0f}s)",
            flush=True,
        )
    popularity = evaluate_query_fn(
        lambda h: np.ones((len(h), 1), np.float32), pop.astype(np.float32)[:, None], split, progress=False
    )["test"]
    return {
        "users": len(split.test),
        "items": split.data.n_items,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "seed": seed,
        "centralised": centralised,
        "runs": runs,
        "popularity": popularity,
    }


def markdown(result: dict, label: str, date: str, command: str, machine: str) -> str:
    c = result["centralised"]
    cfg = c["config"]
    e = result["local_epochs"]
    lines = [
        f"# Federated (Flower FedAvg) against centralised training on {label} ({date})",
        "",
        f"Command: `{command}`. Machine: {machine}.",
        "",
        f"{result['users']} users, {result['items']} items; leave-one-out, exact full ranking, seen items excluded; "
        f"seed {result['seed']}. Model and step (every row): dim {cfg['dim']}, {cfg['n_blocks']} blocks, "
        f"max_len {cfg['max_len']}, loss {cfg['loss']}, batch {cfg['batch_size']}, lr {cfg['lr']}. Federated: users "
        f"shuffled by the seed into K disjoint shards, {result['rounds']} rounds of {e} local epoch(s) per client, "
        "FedAvg weighted by the clients' training windows, Flower grpc-bidi on 127.0.0.1; validation NDCG@10 on "
        "the server after every round, the best round is what would be published. Centralised: the same "
        f"settings for {c['epochs']} epochs (the same passes over the data), best epoch by validation.",
        "",
        "| training | best round / epoch | best valid NDCG@10 | test NDCG@10 (at best) | test HR@10 | seconds |",
        "|---|---|---|---|---|---|",
        f"| centralised | {c['best_epoch']} | {c['best_valid_ndcg@10']:.4f} | {c['test']['ndcg@10']:.4f} | "
        f"{c['test']['hr@10']:.4f} | {c['seconds']:.0f} |",
    ]
    for r in result["runs"]:
        t = r["test_at_best_round"]
        lines.append(
            f"| federated, K = {r['clients']} | {r['best_round']} | {r['best_valid_ndcg@10']:.4f} | "
            f"{t['ndcg@10']:.4f} | {t['hr@10']:.4f} | {r['seconds']:.0f} |"
        )
    b = result["popularity"]
    lines += [f"| popularity | – | – | {b['ndcg@10']:.4f} | {b['hr@10']:.4f} | – |", ""]
    head = " | ".join(f"K = {r['clients']} valid | K = {r['clients']} test" for r in result["runs"])
    lines += ["Round by round (NDCG@10; centralised: epoch = round x local epochs):", ""]
    lines += [f"| round | {head} | centralised valid |", "|---|" + "---|" * (2 * len(result["runs"]) + 1)]
    central_valid = {h["epoch"]: h["valid_ndcg@10"] for h in c["history"]}
    for i in range(result["rounds"]):
        cells = []
        for r in result["runs"]:
            p = r["curve"][i] if i < len(r["curve"]) else None
            cells += [f"{p['valid_ndcg@10']:.4f}", f"{p['test_ndcg@10']:.4f}"] if p else ["–", "–"]
        cv = central_valid.get((i + 1) * e)
        lines.append(f"| {i + 1} | {' | '.join(cells)} | {'–' if cv is None else f'{cv:.4f}'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, label: str, path: Path) -> None:
    from .plots import new_figure

    fig, (ax,) = new_figure(1, width=7.0, height=4.5)
    e = result["local_epochs"]
    for i, r in enumerate(result["runs"]):
        xs = [p["round"] for p in r["curve"]]
        ax.plot(
            xs,
            [p["test_ndcg@10"] for p in r["curve"]],
            "o-",
            color=f"C{i}",
            ms=3,
            label=f"FedAvg K={r['clients']} test",
        )
        ax.plot(
            xs, [p["valid_ndcg@10"] for p in r["curve"]], "--", color=f"C{i}", lw=1, label=f"K={r['clients']} valid"
        )
    c = result["centralised"]
    hist = [h for h in c["history"] if h["epoch"] % e == 0]
    ax.plot(
        [h["epoch"] // e for h in hist],
        [h["valid_ndcg@10"] for h in hist],
        "--",
        color="k",
        lw=1,
        label="centralised valid",
    )
    ax.axhline(c["test"]["ndcg@10"], color="k", lw=1.5, label=f"centralised test (best epoch {c['best_epoch']})")
    ax.axhline(result["popularity"]["ndcg@10"], color="grey", ls=":", label="popularity test")
    ax.set_xlabel(f"round ({e} local epoch{'s' if e > 1 else ''} per client; centralised: epoch / {e})")
    ax.set_ylabel("NDCG@10")
    ax.set_title(f"{label}: federated (Flower FedAvg) vs centralised, {result['users']} users")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, train_flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        prog="python -m attnrec.benchmarks.federated_curve", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data", type=Path, required=True, help="interaction log (any format `attnrec train` reads)")
    p.add_argument("--clients", default="4", help="comma-separated numbers of clients K (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=20, help="federated rounds R (default: %(default)s)")
    p.add_argument(
        "--local-epochs", type=int, default=1, help="local epochs per client per round (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shards, initialisation and data order (default: 0)")
    add_curve_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(own)
    clients = [int(x) for x in args.clients.split(",") if x.strip()]
    return run_curve(
        args,
        "federated",
        "federated_curve",
        argv,
        lambda: measure(args.data, clients, args.rounds, args.local_epochs, args.seed, train_flags, args.quiet),
        markdown,
        plot,
    )


if __name__ == "__main__":
    raise SystemExit(main())

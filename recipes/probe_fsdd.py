#!/usr/bin/env python3
"""Linear probes on the Free Spoken Digit Dataset for one or more models, plus a log-mel baseline.

Two tasks, each with features from the same single embedding pass per model:
  digit    label ``text``,    split by speaker   (test speakers never heard in training)
  speaker  label ``speaker``, split by utterance (stratified per speaker)

    python recipes/probe_fsdd.py --out results/fsdd \\
        random-small=random:small pretrained=runs/pretrain/checkpoint_last finetuned=runs/ft/best

A model is ``NAME=SOURCE`` or just ``SOURCE`` (any ``w2v2.load_model`` source; ``random:PRESET``
builds a randomly initialised model, seed 0, saved to a temporary directory and loaded back).
Writes ``OUT/results.json``, ``OUT/results.md`` (a table per task) and ``OUT/accuracy_by_layer.png``
(one panel per task, one line per model, the baseline dashed, chance dotted).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import w2v2
from w2v2.audio import load_audio
from w2v2.embed import Item, read_manifest, rows_to_items
from w2v2.fileio import atomic_write_text
from w2v2.probe import (Panel, chance_accuracy, log_mel_features, plot_accuracy, pooled_features, probe_layers,
                        split_rows)

from datapaths import data_dir  # recipes/datapaths.py: the run's default data location

TASKS = {  # name -> (label column, split)
    "digit": ("text", "speaker"),
    "speaker": ("speaker", "utterance"),
}
TITLES = {"digit": "digit recognition (held-out speakers)", "speaker": "speaker identification (held-out utterances)"}
BASELINE = "log-mel mean (80 bands)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("models", nargs="+", help="NAME=SOURCE or SOURCE; SOURCE random:small builds a random-init model")
    p.add_argument("--data", default=str(data_dir() / "fsdd"), help="FSDD folder with manifest.tsv")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--C", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="C grid, chosen per layer by 3-fold CV on the training split (grouped by speaker for digits)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use every k-th file so that only about this many remain (smoke tests)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="CPU threads for torch and BLAS (1 is much faster on a busy machine)")
    return p.parse_args(argv)


def open_model(source: str, tmp: Path, device: str):
    if source.startswith("random:"):
        preset = source.split(":", 1)[1]
        torch.manual_seed(0)
        w2v2.save_pretrained(w2v2.build_model(w2v2.config.preset(preset)), tmp / preset)
        source = str(tmp / preset)
    return w2v2.load_model(source, device=device, with_quantizer=False)


def load_rows(data: Path, limit: int | None) -> tuple[list[dict], list[Item]]:
    """Manifest rows and items holding the decoded audio (decoded once, shared by every model)."""
    rows = read_manifest(data / "manifest.tsv")
    if limit and limit < len(rows):
        rows = rows[:: -(-len(rows) // limit)]
    items = rows_to_items(rows)
    for it in tqdm(items, desc="decoding", unit="file", file=sys.stderr):
        it.source = load_audio(it.source)
    return rows, items


def make_splits(rows: list[dict], args) -> dict[str, tuple[list[int], list[int]]]:
    """{task: (train, test) row indices}: made once, so that every model is tested on the same files."""
    return {task: split_rows(rows, split, label_column=label, test_fraction=args.test_fraction, seed=args.seed)
            for task, (label, split) in TASKS.items()}


def run_tasks(x: np.ndarray, layers: list[int], rows: list[dict], kept: list[int], splits: dict, args) -> dict:
    """{task: {"layers": [...LayerResult dicts], "chance": float, ...}}; x: (kept files, layers, dim)."""
    out = {}
    pos = {i: k for k, i in enumerate(kept)}  # row index -> row of x
    for task, (label, split) in TASKS.items():
        tr = [i for i in splits[task][0] if i in pos]
        te = [i for i in splits[task][1] if i in pos]
        y = np.array([r[label] for r in rows])
        groups = [rows[i]["speaker"] for i in tr] if split == "speaker" else None
        t0 = time.time()
        res = probe_layers(x[[pos[i] for i in tr]], y[tr], x[[pos[i] for i in te]], y[te], layers=layers,
                           Cs=args.C, cv_groups=groups, seed=args.seed)
        out[task] = {"label": label, "split": split, "n_train": len(tr), "n_test": len(te),
                     "chance": chance_accuracy(y[tr], y[te]), "seconds": round(time.time() - t0, 1),
                     "layers": [r.to_dict() for r in res]}
        if split == "speaker":
            out[task]["test_speakers"] = sorted({rows[i]["speaker"] for i in te})
        best = max(res, key=lambda r: r.accuracy)
        print(f"  {task}: best layer {best.layer} acc {best.accuracy:.3f} ({out[task]['seconds']} s)", file=sys.stderr)
    return out


def markdown(results: dict) -> str:
    lines = []
    for task in TASKS:
        lines += [f"### {TITLES[task]}", "", "| model | " + " | ".join(f"L{i}" for i in range(_max_layers(results, task)))
                  + " | best |", "|---" * (_max_layers(results, task) + 2) + "|"]
        for name, r in results["models"].items():
            accs = {d["layer"]: d["accuracy"] for d in r["tasks"][task]["layers"]}
            cells = [f"{accs[i]:.3f}" if i in accs else "" for i in range(_max_layers(results, task))]
            best = max(accs, key=accs.get)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {accs[best]:.3f} (L{best}) |")
        if "baseline" in results:
            acc = results["baseline"]["tasks"][task]["layers"][0]["accuracy"]
            lines.append(f"| {BASELINE} |" + " |" * _max_layers(results, task) + f" {acc:.3f} |")
        any_task = next(iter(results["models"].values()), results.get("baseline"))["tasks"][task]
        lines += ["", f"chance (majority label): {any_task['chance']:.3f}; "
                  f"{any_task['n_train']} train / {any_task['n_test']} test files", ""]
    return "\n".join(lines)


def _max_layers(results: dict, task: str) -> int:
    return max((len(r["tasks"][task]["layers"]) for r in results["models"].values()), default=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, items = load_rows(Path(args.data), args.limit)
    splits = make_splits(rows, args)
    results = {"data": args.data, "files": len(rows), "C_grid": args.C, "seed": args.seed, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            name, _, source = spec.rpartition("=")
            name = name or Path(source).name
            print(f"{name}: {source}", file=sys.stderr)
            model = open_model(source, Path(tmp), args.device)
            t0 = time.time()
            with tqdm(total=len(items), desc="embedding", unit="file", file=sys.stderr) as bar:
                x, layers, kept, errors = pooled_features(model, items, batch_size=args.batch_size,
                                                          device=args.device, progress=lambda e: bar.update(1))
            results["models"][name] = {"source": source, "embed_seconds": round(time.time() - t0, 1),
                                       "skipped": len(errors), "tasks": run_tasks(x, layers, rows, kept, splits, args)}
            del model
    if not args.no_baseline:
        print(f"{BASELINE}", file=sys.stderr)
        x, kept, errors = log_mel_features(items)
        results["baseline"] = {"name": BASELINE, "tasks": run_tasks(x, [0], rows, kept, splits, args)}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", markdown(results))
    panels = {}
    for task in TASKS:
        curves = {name: ([d["layer"] for d in r["tasks"][task]["layers"]],
                         [d["accuracy"] for d in r["tasks"][task]["layers"]]) for name, r in results["models"].items()}
        base = {BASELINE: results["baseline"]["tasks"][task]["layers"][0]["accuracy"]} if "baseline" in results else None
        chance = next(iter(results["models"].values()))["tasks"][task]["chance"] if results["models"] else None
        panels[TITLES[task]] = Panel(curves, base, chance)
    plot_accuracy(panels, out / "accuracy_by_layer.png")
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md, accuracy_by_layer.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speaker-disjoint fine-tuning splits of the shared speech data (deterministic, seeded).

    python recipes/make_splits.py [OUT_DIR] [--data DATA] [--seed 0] [--dev-speakers 15]

reads DATA (default ``$W2V2_DATA``, else ../shared/data beside the checkout) and writes into
OUT_DIR (default runs/splits in the checkout, git-ignored):

    dev.tsv             ~15 speakers of speechocean762-train, all their utterances
    train-10min.tsv     nested subsets of the *other* speakers' utterances:
    train-1h.tsv            train-10min ⊂ train-1h ⊂ train-all
    train-all.tsv
    test-ljspeech.tsv   ljspeech-amateur, all of it (a second, out-of-domain test set)
    README.txt          what each file holds (utterances, speakers, hours)

Each file is a manifest with the header ``path seconds speaker text``; paths are absolute,
texts are the corpus's own, byte for byte (normalisation happens in training and scoring;
manifests are read by ``w2v2.data.read_rows`` and written in its format: tabs, no quoting).

The small training subsets spread over as many speakers as possible: the training speakers
are shuffled, each speaker's utterances are shuffled, then utterances are taken round-robin
(first utterance of every speaker, then the second, ...) and each subset is the longest prefix
of that order that fits its duration. So a 10-minute set hears ~100 speakers once or twice
rather than 7 speakers twenty times, and every smaller set is a prefix of every larger one.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

from datapaths import data_dir, runs_dir  # recipes/datapaths.py
from w2v2.data import ManifestError, read_rows

DEFAULT_DATA = data_dir()
DEFAULT_OUT = runs_dir() / "splits"
SUBSETS = {"train-10min": 600.0, "train-1h": 3600.0}  # name -> seconds; train-all takes the rest
FIELDS = ("path", "seconds", "speaker", "text")


def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest (``w2v2.data.read_rows``) with ``path`` made absolute."""
    try:
        rows = read_rows(path, required=FIELDS)
    except ManifestError as e:
        raise SystemExit(str(e)) from None
    for r in rows:
        r["path"] = str((path.parent / r["path"]).resolve())
    return rows


def write_manifest(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, delimiter="\t", lineterminator="\n",
                           extrasaction="ignore", quoting=csv.QUOTE_NONE, quotechar=None)
        w.writeheader()
        w.writerows(rows)


def by_speaker(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["speaker"]].append(r)
    return groups


def round_robin(groups: dict[str, list[dict]], rng: random.Random) -> list[dict]:
    """Speakers and their utterances shuffled, then interleaved: one utterance per speaker per round."""
    speakers = sorted(groups)
    rng.shuffle(speakers)
    queues = []
    for s in speakers:
        utts = sorted(groups[s], key=lambda r: r["path"])
        rng.shuffle(utts)
        queues.append(utts)
    order = []
    for i in range(max((len(q) for q in queues), default=0)):
        order.extend(q[i] for q in queues if i < len(q))
    return order


def prefix_within(order: list[dict], seconds: float) -> list[dict]:
    """The longest prefix of ``order`` whose total duration is at most ``seconds``."""
    out, total = [], 0.0
    for r in order:
        if total + float(r["seconds"]) > seconds:
            break
        out.append(r)
        total += float(r["seconds"])
    return out


def make_splits(data: Path, seed: int = 0, dev_speakers: int = 15) -> dict[str, list[dict]]:
    rows = read_manifest(data / "speechocean762-train" / "manifest.tsv")
    groups = by_speaker(rows)
    rng = random.Random(seed)
    speakers = sorted(groups)
    if dev_speakers >= len(speakers):
        raise SystemExit(f"--dev-speakers {dev_speakers} leaves no training speakers (there are {len(speakers)})")
    dev = set(rng.sample(speakers, dev_speakers))
    train_groups = {s: g for s, g in groups.items() if s not in dev}
    order = round_robin(train_groups, rng)
    splits = {"dev": sorted((r for s in sorted(dev) for r in groups[s]), key=lambda r: r["path"])}
    for name, seconds in SUBSETS.items():
        splits[name] = prefix_within(order, seconds)
    splits["train-all"] = order
    splits["test-ljspeech"] = read_manifest(data / "ljspeech-amateur" / "manifest.tsv")
    return splits


def describe(splits: dict[str, list[dict]]) -> str:
    lines = [f"{'split':<16}{'utts':>6}{'speakers':>10}{'hours':>8}"]
    for name, rows in splits.items():
        hours = sum(float(r["seconds"]) for r in rows) / 3600
        lines.append(f"{name:<16}{len(rows):>6}{len({r['speaker'] for r in rows}):>10}{hours:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT, help="folder for the manifests")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dev-speakers", type=int, default=15)
    args = p.parse_args(argv)
    splits = make_splits(args.data, args.seed, args.dev_speakers)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_manifest(args.out / f"{name}.tsv", rows)
    table = describe(splits)
    (args.out / "README.txt").write_text(
        f"Made by recipes/make_splits.py --seed {args.seed} --dev-speakers {args.dev_speakers} "
        f"from {args.data}\n\n{table}\n", encoding="utf-8")
    print(table)
    print(f"wrote {len(splits)} manifests to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

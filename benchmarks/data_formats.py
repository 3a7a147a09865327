"""Reading training data from tar shards against reading the same files listed in a TSV.

    python benchmarks/data_formats.py [--data DIR] [--limit 600] [--workers 2]

Takes the first ``--limit`` utterances of ``DIR/speechocean762-train`` (``--data``, else
``$W2V2_DATA``, else ../shared/data beside the checkout), times ``w2v2 prepare`` on them, then
one fine-tuning-style epoch (no crop, max_tokens 1.6 M samples, in-process loading: the decode
cost alone) from the files (AudioDataset + BucketBatchSampler) and from the shards
(formats.stream), and prints one table, side by side.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's w2v2, not an installed one

from w2v2.data import AudioDataset, BucketBatchSampler, Collate, list_entries, make_loader_factory, read_rows  # noqa: E402
from w2v2.formats.prepare import prepare  # noqa: E402
from w2v2.formats.shards import load_catalog  # noqa: E402
from w2v2.formats.stream import StreamOptions, shard_loader  # noqa: E402

MAX_TOKENS = 1_600_000


def epoch(factory) -> tuple[float, int, float]:
    """(seconds, utterances, audio seconds) of one epoch."""
    start, count, samples = time.perf_counter(), 0, 0
    for batch in factory(0, 0):
        count += len(batch["lengths"])
        samples += int(batch["lengths"].sum())
    return time.perf_counter() - start, count, samples / 16000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("W2V2_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--limit", type=int, default=600)
    p.add_argument("--workers", type=int, default=2, help="w2v2 prepare's processes")
    args = p.parse_args()
    folder = Path(args.data) / "speechocean762-train"
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "subset.tsv"
        rows = read_rows(folder / "manifest.tsv")[: args.limit]
        tsv.write_text("path\tseconds\tspeaker\ttext\n" + "".join(
            f"{folder / r['path']}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n" for r in rows))
        start = time.perf_counter()
        summary = prepare([str(tsv)], Path(tmp) / "shards", shard_size_mb=2, workers=args.workers)
        prepared = time.perf_counter() - start

        entries = list_entries([tsv])
        ds = AudioDataset(entries, max_samples=None)
        sampler = BucketBatchSampler([ds.num_samples(i) for i in range(len(ds))], MAX_TOKENS)
        files = epoch(make_loader_factory(ds, sampler, Collate()))
        start = time.perf_counter()
        catalog = load_catalog([str(Path(tmp) / "shards")])
        _, factory = shard_loader(catalog, StreamOptions(MAX_TOKENS), Collate())
        opened = time.perf_counter() - start
        shards = epoch(factory)
    hours = summary.seconds / 3600
    print(f"w2v2 prepare: {summary.utterances} utterances ({hours:.2f} h) into {summary.shards} shards in "
          f"{prepared:.1f} s with {args.workers} processes ({summary.seconds / prepared:.0f} s of audio per s)\n")
    print("| source | catalog s | epoch s | utterances | audio s per s |")
    print("|---|---|---|---|---|")
    for name, (seconds, count, audio), catalog_s in (("files (TSV)", files, 0.0), ("tar shards", shards, opened)):
        print(f"| {name} | {catalog_s:.2f} | {seconds:.1f} | {count} | {audio / seconds:.0f} |")


if __name__ == "__main__":
    main()

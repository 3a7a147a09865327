"""What planning an epoch of tar shards costs at corpus size (catalog in memory, no audio read).

    python benchmarks/shard_plan.py [--utterances 1000000] [--per-shard 250]

A synthetic catalog (durations uniform in 1-20 s, each shard sorted by length as w2v2 prepare
writes them) is planned as pretraining does (BASE: 1.4 M samples per batch, 250 k crop), for one
process with 4 loader workers and for 8 processes with 4 each; every rank plans all ranks once
per epoch to cut them to the same number of steps. Prints time per epoch plan and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's w2v2

from w2v2.formats.shards import ShardCatalog  # noqa: E402
from w2v2.formats.stream import ShardPlan, StreamOptions  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utterances", type=int, default=1_000_000)
    p.add_argument("--per-shard", type=int, default=250)
    args = p.parse_args()
    per, shards = args.per_shard, args.utterances // args.per_shard
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    catalog = ShardCatalog([f"s-{i:06d}.tar" for i in range(shards)],
                           [[f"{i * per + j:09d}" for j in range(per)] for i in range(shards)],
                           [np.sort(rng.uniform(1, 20, per)) for _ in range(shards)],
                           [[None] * per for _ in range(shards)], [[None] * per for _ in range(shards)])
    built = time.perf_counter() - start
    keep = [np.ones(per, dtype=bool) for _ in range(shards)]
    print(f"catalog of {len(catalog)} utterances in {shards} shards built in {built:.1f} s\n")
    print("| processes x workers | epoch plan s | batches per rank | peak RSS MB |")
    print("|---|---|---|---|")
    for world, streams in ((1, 4), (8, 4)):
        plan = ShardPlan(catalog, keep, StreamOptions(1_400_000, max_samples=250_000, crop_to_shortest=True),
                         world, streams)
        start = time.perf_counter()
        batches = plan.rank_epoch(0, 0)[1]
        seconds = time.perf_counter() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {world} x {streams} | {seconds:.1f} | {batches} | {rss:.0f} |")


if __name__ == "__main__":
    main()

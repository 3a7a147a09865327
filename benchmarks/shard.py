"""Transcription across processes: one process against torchrun with N, on the same real files.

    python benchmarks/shard.py                     # 24 LJ Speech clips, 1 and 2 processes
    python benchmarks/shard.py --files 8 --procs 1,2,4 --model my-model
    python benchmarks/shard.py --quick             # 4 clips, 1 and 2 processes

Each row is one fresh run of ``w2v2 transcribe FILES -o DIR`` (one process) or of
``python -m torch.distributed.run --standalone --nproc-per-node N -m w2v2 transcribe FILES -o DIR``
(every process with ``OMP_NUM_THREADS=1``, the default model unless ``--model``): wall time from
start to exit (starting Python and torch and loading the model in every process included), CPU
time of all its processes (user + system, from ``getrusage(RUSAGE_CHILDREN)``), and whether its
outputs are byte-identical to the one-process run's. Audio from ``--data`` (a folder with a
``manifest.tsv``; default ``$W2V2_DATA/ljspeech-amateur``, else ../shared/data beside the checkout).
On a machine shared with other work, wall time depends on what else runs: say so with the figures.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def data_folder(given: str | None) -> Path:
    if given:
        return Path(given)
    base = Path(os.environ["W2V2_DATA"]) if os.environ.get("W2V2_DATA") else ROOT.parent / "shared" / "data"
    return base / "ljspeech-amateur"


def clips(folder: Path, n: int) -> tuple[list[str], float]:
    sys.path.insert(0, str(ROOT))
    from w2v2.data import read_rows

    rows = read_rows(folder / "manifest.tsv")[:n]
    return [str(folder / r["path"]) for r in rows], sum(float(r["seconds"]) for r in rows)


def run(procs: int, files: list[str], out: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every process) of one transcription job."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "w2v2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "w2v2"]
    cmd += ["transcribe", *files, "-o", str(out), "--device", "cpu", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:8])} ... failed:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=24)
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated (1 is always run first)")
    p.add_argument("--model", default=None, help="a model folder; 'base': a random BASE CTC model (made here, "
                                                "as benchmarks/transcribe.py makes it); None: the embedded model")
    p.add_argument("--args", default="", help="more options for every run, e.g. '--precision fp32'")
    p.add_argument("--data", default=None)
    p.add_argument("--quick", action="store_true", help="4 files, 1 and 2 processes")
    args = p.parse_args()
    n = 4 if args.quick else args.files
    counts = sorted({1, *(int(c) for c in ("1,2" if args.quick else args.procs).split(","))})
    files, audio = clips(data_folder(args.data), n)
    print(f"{len(files)} files, {audio:.1f} s of audio; {os.cpu_count()} CPU cores; model {args.model or 'embedded'}")
    print(f"{'processes':>9} {'wall s':>8} {'CPU s':>8} {'wall RTF':>9} {'speed-up':>9} {'same bytes':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "base":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from transcribe import make_checkpoint

            model = str(make_checkpoint(Path(tmp) / "base"))
        extra = (["--model", model] if model else []) + args.args.split()
        base = None
        for c in counts:
            out = Path(tmp) / f"out{c}"
            wall, cpu = run(c, files, out, extra)
            base = base or wall
            same = "yes" if c == 1 else ("yes" if same_outputs(Path(tmp) / "out1", out) else "no")
            print(f"{c:>9} {wall:>8.1f} {cpu:>8.1f} {wall / audio:>9.3f} {base / wall:>8.2f}x {same:>10}")


if __name__ == "__main__":
    main()

"""Pretraining start-up at corpus scale: generated manifests of 10 k to 1 M entries (a few real
files repeated, durations in the manifest's ``seconds`` column), each run in a fresh process
through what ``w2v2 pretrain`` calls (list, check, build the trainer, train), with the ``tiny``
model so that the update itself is cheap.

Prints, per manifest size: seconds to list the manifest, to check the files, to build the
trainer (dataset, sampler, model), and to the end of the first update; the peak RSS of the
trainer process and its growth per entry over a 1 000-entry run; the private memory (USS) of
each DataLoader worker at the first update (forked workers share the entry table's pages).
``--task finetune`` times ``w2v2.finetune.finetune`` the same way, to the end of its first
update (the steps before it are not split; ``--data`` a set with transcripts).

    python benchmarks/manifest_scale.py                      # 10k, 100k, 1M
    python benchmarks/manifest_scale.py --sizes 2000 --quick # a smoke run
    python benchmarks/manifest_scale.py --src OTHER_CHECKOUT # the same runs on another w2v2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "librispeech-unlabeled"
REFERENCE = 1000  # entries of the run whose peak RSS the others are compared with


def write_manifest(path: Path, entries: int, audio: Path, files: int) -> float:
    """A manifest of ``entries`` rows cycling over the first ``files`` rows of ``audio``'s own
    manifest (paths relative to ``path``'s folder, through an ``audio`` link; transcripts kept);
    returns the mean path length in bytes."""
    rows = (audio / "manifest.tsv").read_text().splitlines()[1:files + 1]
    link = path.parent / "audio"
    if not link.exists():
        link.symlink_to((audio / "audio").resolve())
    lines = [r.split("\t") for r in rows]
    with open(path, "w") as f:
        f.write("path\tseconds\tspeaker\ttext\n")
        for i in range(entries):
            p, seconds, speaker, text = lines[i % len(lines)]
            f.write(f"{p}\t{seconds}\t{speaker}\t{text}\n")
    return sum(len(r[0]) for r in lines) / len(lines)


def _status_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _worker_uss_mb() -> list[float]:
    """Private memory (USS) of each child process, in MB."""
    children = []
    for task in Path("/proc/self/task").iterdir():
        children += (task / "children").read_text().split()
    out = []
    for pid in children:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kb = sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean",
                                                                                          "Private_Dirty")))
        out.append(kb / 1024)
    return out


def child(manifest: str, run_dir: str, workers: int) -> dict:
    """One start-up, timed: list, check, build, first update (runs in a fresh process)."""
    import torch

    from w2v2 import data, pretrain

    torch.set_num_threads(1)
    cfg = pretrain.preset_config("tiny", {"train": {"max_updates": 1, "progress": False, "device": "cpu",
                                                    "save_interval": 10**6},
                                          "data": {"num_workers": workers}})
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    entries = data.list_entries([manifest])
    t_list = time.perf_counter()
    check = getattr(data, "check_entries", None) or data.validate_entries  # the peer has only the latter
    good, bad = check(entries, min_seconds=cfg.data.min_samples / cfg.model.sampling_rate)
    t_check = time.perf_counter()
    trainer = pretrain.build_trainer(good, run_dir, cfg)
    t_build = time.perf_counter()
    seen = {}

    def first_update(trainer, row):
        seen.setdefault("t", time.perf_counter())
        seen.setdefault("uss", _worker_uss_mb())

    trainer.hooks.append(first_update)
    trainer.train()
    return {"entries": len(entries), "good": len(good), "list_s": t_list - t0, "check_s": t_check - t_list,
            "build_s": t_build - t_check, "first_update_s": seen["t"] - t0, "rss_before_mb": before_kb / 1024,
            "peak_mb": _status_kb("VmHWM") / 1024, "worker_uss_mb": seen["uss"]}


def finetune_child(manifest: str, run_dir: str, workers: int) -> dict:
    """One fine-tuning start-up, timed to the end of its first update (the validation set: the
    manifest's first 3 rows)."""
    import torch

    from w2v2 import finetune as ft

    torch.set_num_threads(1)
    valid = Path(run_dir).parent / "valid.tsv"
    with open(manifest) as f:
        valid.write_text("".join(f.readline() for _ in range(4)))
    seen = {}

    class Trainer(ft.Trainer):  # the run's own trainer, with a hook timing its first update
        def __init__(self, *args, hooks=(), **kw):
            def first_update(trainer, row):
                seen.setdefault("t", time.perf_counter())
                seen.setdefault("uss", _worker_uss_mb())
            super().__init__(*args, hooks=[*hooks, first_update], **kw)

    ft.Trainer = Trainer
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    ft.finetune("random:tiny", [manifest], [str(valid)], run_dir,
                ft.FinetuneConfig(num_workers=workers, max_tokens=200_000, valid_interval=10**6),
                ft.FinetuneTrainConfig(max_updates=1, progress=False, device="cpu", save_interval=10**6))
    return {"first_update_s": seen["t"] - t0, "rss_before_mb": before_kb / 1024,
            "peak_mb": _status_kb("VmHWM") / 1024, "worker_uss_mb": seen["uss"]}


def run_child(src: Path, manifest: Path, run_dir: Path, workers: int, timeout: float, task: str) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--task", task, "--child", str(manifest), str(run_dir),
                           str(workers)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(f"[child failed: {manifest}]\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("pretrain", "finetune"), default="pretrain",
                   help="the start-up timed (fine-tuning needs transcripts: --data a transcribed set)")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--files", type=int, default=20, help="real files the manifests cycle over")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("W2V2_DATA", DATA.parent)) / DATA.name,
                   help="a folder with audio/ and manifest.tsv (default: the shared LibriSpeech sample)")
    p.add_argument("--src", type=Path, default=ROOT, help="the checkout whose w2v2 runs")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="no 1 000-entry reference run")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("PYTHONPATH", str(ROOT)))
        run = child if args.task == "pretrain" else finetune_child
        print(json.dumps(run(args.child[0], args.child[1], int(args.child[2]))))
        return
    with tempfile.TemporaryDirectory(prefix="manifest_scale_") as tmp:
        tmp = Path(tmp)
        results = {}
        for n in ([] if args.quick else [REFERENCE]) + args.sizes:
            manifest = tmp / f"m{n}.tsv"
            path_bytes = write_manifest(manifest, n, args.data, args.files)
            results[n] = run_child(args.src, manifest, tmp / f"run{n}", args.workers, args.timeout, args.task)
            manifest.unlink()
        ref = results.get(REFERENCE)
        print(f"\n{args.task}, w2v2 from {args.src.name}; {args.files} real files repeated, paths of "
              f"{path_bytes:.0f} bytes, {args.workers} DataLoader workers, tiny model, 1 thread\n")
        print("| entries | list (s) | check (s) | build (s) | first update (s) | peak RSS (MB) | "
              "bytes/entry over 1k | worker USS (MB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---|")
        for n in args.sizes:
            r = results[n]
            if r is None:
                print(f"| {n} | failed | | | | | | |")
                continue
            growth = ((r["peak_mb"] - ref["peak_mb"]) * 2**20 / (n - REFERENCE)) if ref and n > REFERENCE else None
            steps = " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("list_s", "check_s", "build_s"))
            print(f"| {n} | {steps} | {r['first_update_s']:.2f} "
                  f"| {r['peak_mb']:.0f} | {'' if growth is None else f'{growth:.0f}'} | "
                  f"{', '.join(f'{u:.0f}' for u in r['worker_uss_mb'])} |")


if __name__ == "__main__":
    main()

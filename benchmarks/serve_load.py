"""Load test of ``w2v2 serve``: N concurrent clients against one client at a time, on loopback.

    python benchmarks/serve_load.py                         # 8 clients, 60 s per phase, embedded model
    python benchmarks/serve_load.py --seconds 600 --sequential-seconds 60   # the 10-minute soak (flat memory)
    python benchmarks/serve_load.py --quick                 # 2 clients, 10 s per phase: tests the script
    python benchmarks/serve_load.py --model DIR --clients 16 --threads 2

Real speech of mixed lengths (ljspeech-amateur clips of 2-12 s, and 30 s / 60 s stretches of them
laid end to end) is posted to POST /v1/audio/transcriptions as fast as each client gets answers.
Each phase runs a fresh server (`w2v2 serve --port 0`, 127.0.0.1 only) for a fixed time and a
bounded number of requests, then stops it with SIGTERM. Reported per phase: throughput in audio
seconds per wall second, latency percentiles, errors, and the server's resident memory sampled
every second (peak; mean over the first and the last quarter of the phase, whose difference is
the drift a leak would show).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's w2v2, not an installed one

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from w2v2.data import read_manifest  # noqa: E402
from w2v2.serve.process import ServerProcess  # noqa: E402

DATA = Path(os.environ.get("W2V2_DATA") or ROOT.parent / "shared" / "data")


def make_inputs(folder: Path, limit: int = 24) -> list[tuple[Path, float]]:
    """(wav path, seconds): clips as they are plus 30 s and 60 s stretches of them laid end to end."""
    rows = read_manifest(DATA / "ljspeech-amateur" / "manifest.tsv")[:limit]
    from w2v2.audio import load_audio

    clips = [load_audio(r.path) for r in rows]
    out = []
    for i, wav in enumerate(clips):
        out.append(_write(folder / f"clip{i:02d}.wav", wav))
    joined = np.concatenate(clips)
    for seconds in (30, 60):
        out.append(_write(folder / f"long{seconds}.wav", joined[: seconds * 16000]))
    return out


def _write(path: Path, wav: np.ndarray) -> tuple[Path, float]:
    sf.write(path, wav, 16000)
    return path, len(wav) / 16000


class Phase:
    def __init__(self, url: str, inputs: list[tuple[Path, float]], clients: int, seconds: float, max_requests: int):
        self.url, self.inputs, self.clients, self.seconds = url, inputs, clients, seconds
        self.max_requests = max_requests
        self.latencies: list[float] = []
        self.audio = 0.0
        self.errors: list[str] = []
        self.issued = 0
        self.lock = threading.Lock()

    def _next(self) -> tuple[Path, float] | None:
        with self.lock:
            if self.issued >= self.max_requests:
                return None
            item = self.inputs[self.issued % len(self.inputs)]
            self.issued += 1
            return item

    def client(self, deadline: float) -> None:
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < deadline and (item := self._next()) is not None:
                path, seconds = item
                t0 = time.monotonic()
                try:
                    with open(path, "rb") as f:
                        r = http.post(self.url + "/v1/audio/transcriptions", files={"file": (path.name, f)},
                                      data={"response_format": "json"})
                    ok = r.status_code == 200
                    problem = f"{r.status_code} {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, problem = False, f"{type(e).__name__}: {e}"
                with self.lock:
                    if ok:
                        self.latencies.append(time.monotonic() - t0)
                        self.audio += seconds
                    else:
                        self.errors.append(problem)

    def run(self) -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(self.clients) as pool:
            for f in [pool.submit(self.client, t0 + self.seconds) for _ in range(self.clients)]:
                f.result()
        return time.monotonic() - t0


def rss_sampler(pid: int, samples: list[tuple[float, int]], stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            return
        samples.append((time.monotonic(), kb * 1024))


def run_phase(args, inputs, clients: int, seconds: float) -> dict:
    env = {"OMP_NUM_THREADS": str(args.threads)}
    server_args = ["--max-queue", str(max(16, 2 * clients)), *args.server_args.split()]
    server_args += ["--model", args.model] if args.model else []
    server = ServerProcess(*server_args, env=env)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=rss_sampler, args=(server.pid, samples, stop), daemon=True)
    sampler.start()
    try:
        phase = Phase(server.url, inputs, clients, seconds, args.max_requests)
        wall = phase.run()
    finally:
        stop.set()
        sampler.join()
        status = server.stop()
    lat = sorted(phase.latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    rss = [b for _, b in samples]
    quarter = max(1, len(rss) // 4)
    return {
        "clients": clients, "requests": len(lat), "errors": len(phase.errors), "wall": wall,
        "throughput": phase.audio / wall, "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99),
        "rss_peak": max(rss, default=0), "rss_first": statistics.mean(rss[:quarter]) if rss else 0,
        "rss_last": statistics.mean(rss[-quarter:]) if rss else 0, "exit": status,
        "error_sample": phase.errors[:3],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the loaded phase")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the loaded phase")
    p.add_argument("--sequential-seconds", type=float, default=None,
                   help="length of the one-client phase; None: --seconds")
    p.add_argument("--max-requests", type=int, default=5000, help="bound on the requests of each phase")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server")
    p.add_argument("--model", default=None, help="served model (default: the embedded one)")
    p.add_argument("--server-args", default="", help="more flags for w2v2 serve, e.g. '--batch-size 1'")
    p.add_argument("--quick", action="store_true", help="2 clients, 10 s per phase")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.seconds = 2, min(args.seconds, 10.0)
    sequential = args.sequential_seconds or args.seconds
    with tempfile.TemporaryDirectory(prefix="w2v2-load-") as tmp:
        inputs = make_inputs(Path(tmp))
        print(f"inputs: {len(inputs)} files, {sum(s for _, s in inputs):.0f} s of real speech, "
              f"{min(s for _, s in inputs):.1f}-{max(s for _, s in inputs):.0f} s each; server threads {args.threads}; "
              f"{sequential:g} s with one client, {args.seconds:g} s with {args.clients}", flush=True)
        results = [run_phase(args, inputs, 1, sequential), run_phase(args, inputs, args.clients, args.seconds)]
    mb = 1 / (1 << 20)
    print("| clients | requests | errors | audio s / s | p50 s | p95 s | p99 s | peak RSS MB | RSS first → last quarter MB | exit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput']:.1f} | {r['p50']:.2f} | "
              f"{r['p95']:.2f} | {r['p99']:.2f} | {r['rss_peak'] * mb:.0f} | {r['rss_first'] * mb:.0f} → "
              f"{r['rss_last'] * mb:.0f} | {r['exit']} |")
    print(f"speed-up of {args.clients} clients over one: {results[1]['throughput'] / results[0]['throughput']:.2f}x")
    for r in results:
        for e in r["error_sample"]:
            print(f"error ({r['clients']} clients): {e}")
    return 0 if all(r["errors"] == 0 and r["exit"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

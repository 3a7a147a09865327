"""Throughput and peak memory of ``w2v2.transcribe`` vs transformers' ASR pipeline.

    python benchmarks/transcribe.py            # 10 s, 60 s, 20 min for both; 60 min for ours
    python benchmarks/transcribe.py --quick    # 10 s and 60 s only
    python benchmarks/transcribe.py --device cuda --precision bf16 --sizes 60s,20min,60min

Both engines load the same BASE-size CTC checkpoint with random weights
(``Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32))`` saved with its tokenizer and feature
extractor), use 30 s chunks with 5 s strides and greedy decoding; by default fp32 on CPU
with batch size 1 (on a GPU: batches of 8 chunks; ``--precision bf16`` is the model's own bf16
path for ours, ``set_precision("bf16")``, and a bf16 model for transformers). Inputs are real speech (LibriSpeech clips from
../shared/data, or any folder of audio files, concatenated into a 16 kHz wav). Each (engine, input) runs in a fresh subprocess, so its peak RSS
(``getrusage().ru_maxrss``: Python, torch, the model and everything else) is its own.
RTF = wall time of the transcription (reading the file included, loading the model not)
divided by the audio's duration; lower is faster. ``--warm`` first transcribes 4 s of the input
in the same process, timed apart (one-time setup: the CUDA context, cuBLAS/cuDNN plans), so that
RTF is the steady state. On a GPU the peak GPU memory is reported too. The texts of both engines are compared
(character error rate of ours against theirs, when jiwer is installed): same model, same
chunk layout, so they should agree but for near-ties of a random model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "librispeech-unlabeled"
SIZES = {"10s": 10, "60s": 60, "20min": 1200, "60min": 3600}


# --------------------------------------------------------------------------- setup
def make_checkpoint(directory: Path) -> Path:
    """A random BASE CTC model with tokenizer and feature extractor, loadable by both engines."""
    import torch
    from transformers import (Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor,
                              Wav2Vec2ForCTC, Wav2Vec2Processor)

    from w2v2.fairseq_format import LIBRISPEECH_LETTERS

    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32)).save_pretrained(directory)
    vocab = directory / "vocab.json"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(LIBRISPEECH_LETTERS)}))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def make_speech(path: Path, seconds: float, folder: Path = DATA) -> Path:
    """Concatenate real clips (looping over them if needed) into a 16-bit 16 kHz wav, block by block."""
    import numpy as np
    import soundfile as sf

    from w2v2.audio import list_audio_files, load_audio
    from w2v2.data import read_rows

    if (folder / "manifest.tsv").exists():
        clips = [folder / r["path"] for r in read_rows(folder / "manifest.tsv")]
    else:
        clips = [Path(p) for p in list_audio_files([str(folder)])]
    if not clips:
        raise SystemExit(f"no audio files in {folder}")
    need = int(seconds * 16000)
    with sf.SoundFile(path, "w", samplerate=16000, channels=1, subtype="PCM_16") as out:
        i = 0
        while need > 0:
            audio = load_audio(clips[i % len(clips)])[:need]
            out.write(np.clip(audio, -1, 1))
            need -= len(audio)
            i += 1
    return path


# --------------------------------------------------------------------------- engines (run in a child)
def load_ours(model_dir: str, device: str, batch_size: int, precision: str):
    """Our engine: load the model, return a function audio path -> text."""
    from w2v2 import load_model
    from w2v2.transcribe import TranscribeOptions, transcribe

    model = load_model(model_dir, device=device)
    options = TranscribeOptions(chunk_seconds=30, stride_seconds=5, batch_size=batch_size, device=device,
                                precision=precision)
    return lambda audio: transcribe(model, audio, options)["text"]


def load_transformers(model_dir: str, device: str, batch_size: int, precision: str):
    """transformers' ASR pipeline (a bf16 model for bf16), as a function audio path -> text."""
    import soundfile as sf
    import torch
    from transformers import pipeline

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    asr = pipeline("automatic-speech-recognition", model=model_dir, chunk_length_s=30, stride_length_s=5,
                   device=device, dtype=dtype, batch_size=batch_size)

    def run(audio: str) -> str:
        samples, rate = sf.read(audio, dtype="float32")
        assert rate == 16000
        return asr(samples)["text"]
    return run


ENGINES = {"w2v2": load_ours, "transformers": load_transformers}
WARM_SECONDS = 4  # --warm: this much of the input is transcribed first, timed apart


def child(engine: str, model_dir: str, audio: str, threads: int, device: str = "cpu", batch_size: int = 1,
          precision: str = "fp32", warm: bool = False) -> None:
    import soundfile as sf
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run = ENGINES[engine](model_dir, device, batch_size, precision)
    out = {"load_s": time.perf_counter() - t0}
    if warm:  # one-time setup (CUDA context, cuBLAS/cuDNN plans) on a short piece of the same input
        piece = str(Path(audio).with_suffix(".warm.wav"))
        sf.write(piece, sf.read(audio, frames=WARM_SECONDS * 16000, dtype="float32")[0], 16000)
        t0 = time.perf_counter()
        run(piece)
        out["warm_s"] = time.perf_counter() - t0
        Path(piece).unlink()
    t0 = time.perf_counter()
    out["text"] = run(audio)
    out["run_s"] = time.perf_counter() - t0
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measure(engine: str, model_dir: Path, audio: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, str(model_dir), str(audio), "--threads", str(args.threads),
           "--device", args.device, "--batch-size", str(args.batch_size), "--precision", args.precision,
           *(["--warm"] if args.warm else [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} on {audio.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def normalise(text: str) -> str:
    return " ".join(text.replace("<unk>", "").replace("<s>", "").replace("</s>", "").split())


def cer(hyp: str, ref: str) -> str:
    if normalise(hyp) == normalise(ref):
        return "0 (identical)"
    try:
        import jiwer
    except ImportError:
        return "differs"
    return f"{jiwer.cer(normalise(ref), normalise(hyp)):.4f}" if normalise(ref) else "differs"


def table(rows: list[dict]) -> str:
    gpu = any("peak_gpu_mb" in r for r in rows)
    head = "| input | engine | RTF | peak RSS (MB) |" + (" peak GPU (MB) |" if gpu else "")
    warm = any("warm_s" in r for r in rows)
    head += " model load (s) |" + (f" first {WARM_SECONDS} s call (s) |" if warm else "")
    head += " time ratio (theirs/ours) | RSS ratio (theirs/ours) | CER ours vs theirs |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['input']} | {r['engine']} | {r['rtf']:.4f} | {r['peak_rss_mb']:.0f} |"
        if gpu:
            line += f" {r.get('peak_gpu_mb', 0):.0f} |"
        line += f" {r['load_s']:.1f} |" + (f" {r.get('warm_s', 0):.2f} |" if warm else "")
        line += f" {r.get('rtf_ratio', '')} | {r.get('rss_ratio', '')} | {r.get('cer', '')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 s and 60 s only (no 20 min, no 1 hour)")
    p.add_argument("--sizes", default=None, help=f"comma-separated inputs among {','.join(SIZES)}")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each engine")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=None, help="chunks per forward pass (default 1 on CPU, 8 on GPU)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--audio-dir", type=Path, default=DATA, help="real speech to concatenate into the inputs")
    p.add_argument("--warm", action="store_true",
                   help=f"transcribe the first {WARM_SECONDS} s of each input first, timed apart (one-time setup "
                        "such as CUDA context and cuDNN/cuBLAS plans); RTF is then the steady state")
    p.add_argument("--child", nargs=3, metavar=("ENGINE", "MODEL", "AUDIO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 1)
    if args.child:
        return child(*args.child, args.threads, args.device, args.batch_size, args.precision, args.warm)
    sizes = args.sizes.split(",") if args.sizes else ["10s", "60s"] if args.quick else list(SIZES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="w2v2-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = make_checkpoint(tmp / "base-random")
        for size in sizes:
            audio = make_speech(tmp / f"speech-{size}.wav", SIZES[size], args.audio_dir)
            engines = ["w2v2"] if size == "60min" else ["w2v2", "transformers"]
            results = {e: measure(e, model_dir, audio, args) for e in engines}
            for e, r in results.items():
                row = {"input": size, "engine": e, "rtf": r["run_s"] / SIZES[size], **r}
                if e == "transformers":
                    ours = results["w2v2"]
                    row["rtf_ratio"] = f"{r['run_s'] / ours['run_s']:.2f}"
                    row["rss_ratio"] = f"{r['peak_rss_mb'] / ours['peak_rss_mb']:.2f}"
                    row["cer"] = cer(ours["text"], r["text"])
                rows.append(row)
                print(f"{size:>6} {e:<13} RTF {row['rtf']:.4f}  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            audio.unlink()
    print()
    print(f"device {args.device}, {args.precision}, batch size {args.batch_size}; "
          f"threads per engine: {args.threads} of {os.cpu_count()} CPU cores")
    print(table(rows))


if __name__ == "__main__":
    main()

"""Fixed chunking against --vad on a long recording built from real speech, side by side.

    python benchmarks/vad.py [--utterances 80] [--singles 60] [--repeats 3] [--threads 1] [--data DIR]

The recordings: held-out utterances of speechocean762 (the default model's dev speakers,
``recipes/make_splits.py``), each trimmed of its own leading and trailing silence (its 10 ms
frames TRIM_DB below its loudest at either end), joined with pauses of varied length, with
pink noise over the whole recording (the data holds no recorded noise) at a stated SNR (speech
power over noise power). Three of them (:data:`SCENES`): pauses of 0.3 to 8 s at 20 and 10 dB,
and dense speech (pauses of 0.3 to 1 s) at 20 dB. The utterances' places and texts are known,
so each engine's output is scored against them:

- CPU seconds of the transcription (``time.process_time``, the least of ``--repeats`` interleaved
  runs: the machine is shared), and of the detector alone;
- subtitle cues (the SRT writer's), their durations, and cues that span a pause of 1 s or more;
- words outside every utterance (their middle more than 0.1 s from any), and the error of each
  utterance's first word start and last word end against its boundaries (median, 90th percentile);
- CER of the whole transcript against the utterances' texts in order.

A second table runs ``--singles`` dev utterances each alone, as they are (with their own
leading and trailing silence): how often --vad gives the same text, and both CERs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's w2v2, not an installed one

PAUSES = (0.3, 0.6, 1.0, 1.5, 2.5, 4.0, 8.0)  # seconds between utterances, drawn uniformly
SCENES = (("pauses 0.3-8 s", 20.0, PAUSES), ("pauses 0.3-8 s", 10.0, PAUSES),
          ("dense: pauses 0.3-1 s", 20.0, (0.3, 0.6, 1.0)))  # (name, SNR in dB, pauses)
TRIM_DB = 35.0  # an utterance's edges quieter than its loudest 10 ms by this much are its own silence
OUTSIDE_SECONDS = 0.1  # a word whose middle is further than this from every utterance is outside
LONG_PAUSE = 1.0  # a cue over a pause this long is the kind of cue --vad avoids


@dataclass
class Recording:
    audio: np.ndarray  # float32 (samples,) at 16 kHz
    spans: list[tuple[float, float]]  # each utterance's (start, end) in seconds
    texts: list[str]


def trim(audio: np.ndarray, sr: int = 16000) -> np.ndarray:
    """``audio`` without the leading and trailing 10 ms frames TRIM_DB below its loudest one."""
    frame = sr // 100
    n = len(audio) // frame
    if n == 0:
        return audio
    power = (audio[: n * frame].reshape(n, frame) ** 2).mean(1) + 1e-12
    loud = np.flatnonzero(10 * np.log10(power / power.max()) > -TRIM_DB)
    return audio[loud[0] * frame : (loud[-1] + 1) * frame]


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-power 1/f noise (white noise shaped in the frequency domain)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1))
    noise = np.fft.irfft(spectrum, n)
    return (noise / noise.std()).astype(np.float32)


def build_recording(clips: list[tuple[Path, str]], snr_db: float | None, seed: int = 0,
                    pauses: tuple[float, ...] = PAUSES, sr: int = 16000) -> Recording:
    """The clips, trimmed, joined by pauses drawn from ``pauses`` (one before the first and after
    the last too), with pink noise at ``snr_db`` over the whole of it (None: silent pauses)."""
    from w2v2.audio import load_audio

    rng = np.random.default_rng(seed)
    parts, spans, texts, at = [], [], [], 0
    for path, text in clips:
        gap = np.zeros(round(rng.choice(pauses) * sr), np.float32)
        speech = trim(load_audio(path))
        parts += [gap, speech]
        at += len(gap)
        spans.append((at / sr, (at + len(speech)) / sr))
        texts.append(text)
        at += len(speech)
    parts.append(np.zeros(round(rng.choice(pauses) * sr), np.float32))
    audio = np.concatenate(parts)
    if snr_db is not None:
        speech_power = float(np.mean(np.concatenate([p for p in parts[1::2]]) ** 2))
        audio = audio + pink_noise(len(audio), rng) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return Recording(np.clip(audio, -1, 1).astype(np.float32), spans, texts)


def dev_clips(data: Path, n: int) -> list[tuple[Path, str]]:
    """The first ``n`` utterances (by path) of the default model's held-out dev speakers."""
    sys.path.insert(0, str(ROOT / "recipes"))
    from make_splits import make_splits

    rows = make_splits(data)["dev"][:n]
    return [(data / "speechocean762-train" / r["path"], r["text"]) for r in rows]


# --------------------------------------------------------------------------- scoring
def score(result: dict, rec: Recording) -> dict:
    from w2v2.decoding.segments import subtitle_cues
    from w2v2.evaluate import score as error_rates

    words = [w for s in result["segments"] for w in s["words"]]
    middles = [(w["start"] + w["end"]) / 2 for w in words]
    owner = [next((i for i, (a, b) in enumerate(rec.spans) if a - OUTSIDE_SECONDS <= m <= b + OUTSIDE_SECONDS), None)
             for m in middles]
    starts, ends = [], []
    for i, (a, b) in enumerate(rec.spans):
        mine = [w for w, o in zip(words, owner) if o == i]
        if mine:
            starts.append(abs(mine[0]["start"] - a))
            ends.append(abs(mine[-1]["end"] - b))
    cues = subtitle_cues(result["segments"], result["metadata"]["duration"])
    gaps = [(b1, a2) for (_, b1), (a2, _) in zip(rec.spans, rec.spans[1:]) if a2 - b1 >= LONG_PAUSE]
    spanning = sum(any(s < g0 and g1 < e for g0, g1 in gaps) for s, e, _ in cues)
    durations = [e - s for s, e, _ in cues]
    _, cer, _ = error_rates([" ".join(rec.texts)], [result["text"]])
    return {
        "cues": len(cues), "cue_mean": statistics.mean(durations) if durations else 0.0,
        "cue_max": max(durations, default=0.0), "spanning": spanning,
        "outside": sum(o is None for o in owner), "words": len(words),
        "start_err": _quantiles(starts), "end_err": _quantiles(ends), "cer": cer,
    }


def _quantiles(errors: list[float]) -> str:
    if not errors:
        return "-"
    q = np.quantile(errors, [0.5, 0.9])
    return f"{q[0]:.2f} / {q[1]:.2f}"


# --------------------------------------------------------------------------- main
def transcribe_timed(model, paths: list[Path], vad: bool, precision: str) -> tuple[list[dict], float]:
    """The results of transcribing ``paths`` (one Transcriber) and the CPU seconds (the VAD's
    loading included)."""
    from w2v2.transcribe import TranscribeOptions, Transcriber

    t0 = time.process_time()
    transcriber = Transcriber(model, TranscribeOptions(vad=vad, precision=precision, device="cpu"), model_name="default")
    results = [r for _, r in transcriber.transcribe_many((None, str(p)) for p in paths)]
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results, time.process_time() - t0


def vad_seconds(audio: np.ndarray, repeats: int) -> float:
    """The least CPU seconds of :func:`w2v2.vad.speech_regions` over ``audio`` in ``repeats`` runs."""
    from w2v2.vad import load_vad, speech_regions

    vad, times = load_vad(), []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in speech_regions([audio], vad):
            pass
        times.append(time.process_time() - t0)
    return min(times)


def singles_table(model, clips: list[tuple[Path, str]], precision: str) -> str:
    from benchmarks.harness import markdown_table
    from w2v2.evaluate import score as error_rates

    refs = [t for _, t in clips]
    rows, texts = [], {}
    for vad in (False, True):
        results, cpu = transcribe_timed(model, [p for p, _ in clips], vad, precision)
        texts[vad] = [r["text"] for r in results]
        rows.append(["--vad" if vad else "fixed 30 s chunks", f"{cpu:.1f}", f"{100 * error_rates(refs, texts[vad])[1]:.1f}"])
    same = sum(a == b for a, b in zip(texts[False], texts[True]))
    rows[1].append(f"{same} of {len(clips)}")
    rows[0].append("")
    return markdown_table(["each utterance alone", "CPU s", "CER %", "same text as fixed"], rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("W2V2_DATA", ROOT.parent / "shared" / "data")))
    p.add_argument("--utterances", type=int, default=80)
    p.add_argument("--singles", type=int, default=60, help="utterances transcribed one by one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each engine (the least CPU time counts)")
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()

    import soundfile as sf
    import torch

    import w2v2
    from benchmarks.harness import markdown_table

    torch.set_num_threads(args.threads)
    model = w2v2.load_model(None)
    clips = dev_clips(args.data, args.utterances)
    rows, detector = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, snr, pauses) in enumerate(SCENES):
            rec = build_recording(clips, snr, pauses=pauses)
            path = Path(tmp) / f"scene{i}.wav"
            sf.write(path, rec.audio, 16000, subtype="PCM_16")
            seconds = len(rec.audio) / 16000
            speech = sum(b - a for a, b in rec.spans)
            label = f"{name}, {snr:g} dB: {seconds:.0f} s, {speech:.0f} s speech"
            transcribe_timed(model, [path], False, args.precision)  # warm-up: first shapes, caches
            runs = {False: [], True: []}
            for _ in range(args.repeats):  # interleaved, the least CPU time of each: the machine is shared
                for vad in (False, True):
                    runs[vad].append(transcribe_timed(model, [path], vad, args.precision))
            for vad in (False, True):
                (result,), cpu = runs[vad][0][0], min(t for _, t in runs[vad])
                s = score(result, rec)
                rows.append([label, "--vad" if vad else "fixed 30 s chunks", f"{cpu:.1f}",
                             f"{result['metadata']['frames'] * 0.02:.0f}", s["cues"],
                             f"{s['cue_mean']:.1f} / {s['cue_max']:.1f}", s["spanning"],
                             f"{s['outside']} of {s['words']}", s["start_err"], s["end_err"], f"{100 * s['cer']:.1f}"])
            detector.append(vad_seconds(rec.audio, args.repeats) / seconds)
    print(f"embedded default model, {args.precision}, {args.threads} thread(s), {len(clips)} utterances per "
          f"recording; load average {os.getloadavg()[0]:.1f}")
    print(markdown_table(["recording", "engine", "CPU s", "audio run (s)", "cues", "cue s mean / max",
                          f"cues over a pause ≥ {LONG_PAUSE:g} s", "words outside utterances",
                          "start error s (median / p90)", "end error s (median / p90)", "CER %"], rows))
    print(f"the detector alone (Silero VAD through onnxruntime, 1 thread): {max(detector):.4f} CPU s per s of audio")
    print()
    print(singles_table(model, dev_clips(args.data, args.singles), args.precision))


if __name__ == "__main__":
    main()

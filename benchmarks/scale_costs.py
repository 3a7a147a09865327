"""What the jobs a user plans cost: model FLOPs counted on the real model, GPU-hours and wall time
projected from them for the paper's recipes.

    python benchmarks/scale_costs.py                  # BASE and LARGE counted, BASE timed on this CPU
                                                      # (about 5 minutes on one core)
    python benchmarks/scale_costs.py --quick          # the `tiny` preset in place of both: tests the script
    python benchmarks/scale_costs.py --gpu-tflops 312 --gpu A100   # project for another card

Counting: ``torch.utils.flop_counter.FlopCounterMode`` around one real step of one utterance, batch 1,
on the CPU: pretraining (``PretrainingLoss``: mask, quantizer, negatives, contrastive and diversity
losses, backward), CTC fine-tuning (``CTCFinetuneLoss`` with SpecAugment, feature encoder frozen;
also with the Transformer frozen, the recipe's first updates) and inference (``model.infer``).
The plain forwards (fast path off) and SDPA's math backend run while counting, so that every
product is an operator the counter knows; the function, and so the count, is the same. Matrix
products and convolutions are counted, forward and backward (elementwise work and the optimizer
are not); layerdrop is off (it skips 5-10% of the layers in a real run).

Projection (labelled as such in every table): GPU-hours = counted FLOPs / (GPU bf16 peak x MFU),
wall time = GPU-hours / GPUs, with GPUs capped at the number that the recipe's per-update batch
keeps busy. Training MFU is implied by the paper's own runs (fairseq, fp16, V100): counted FLOPs
of the published schedule over (V100s x days x V100 fp16 peak). Inference uses the forward rate
this repository measured on an H200 (``benchmarks/results/h200-2026-11-27/cuda_check.txt``).
The CPU table is measured here: process CPU time of the shipped model (fast path on), one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import harness
from w2v2 import fast
from w2v2.config import preset
from w2v2.emissions import plan_chunks
from w2v2.finetune import CTCFinetuneLoss, FinetuneConfig, freeze_feature_encoder, set_transformer_trainable
from w2v2.model import build_model
from w2v2.pretrain import PretrainingLoss
from w2v2.vocab import Vocabulary

RATE = 16000
CROP = 250_000  # pretraining crop, samples (15.6 s): paper section 4.2, fairseq max_sample_size
FT_SECONDS = 15.0  # a fine-tuning utterance: LibriSpeech's are 12-16 s on average
CHUNK_SECONDS, STRIDE_SECONDS = 30.0, 5.0  # transcription's default chunk plan (TranscribeOptions)
INFER_SECONDS = (10.0, CHUNK_SECONDS)
YEAR = 365 * 86400

# Peaks in TFLOP/s (NVIDIA datasheets, dense): V100 SXM2 fp16 tensor cores (fairseq trained in fp16),
# H100 SXM bf16.
V100_FP16 = 125.0
H100_BF16 = 989.0
# Forward rate of our model in bf16 on one H200 (8 x 10 s, 61525 GFLOP/s; the H200 has the H100's
# compute peak): benchmarks/results/h200-2026-11-27/cuda_check.txt.
MEASURED_INFER_TFLOPS = 61.5


@dataclass(frozen=True)
class Reference:
    """A published pretraining run: what it cost on V100s (Baevski et al. 2020, section 4.2)."""

    name: str
    model: str
    updates: int
    batch_samples: int  # per GPU (fairseq max_tokens)
    gpus: int
    days: float


REFERENCES = (
    Reference("BASE, LS-960", "BASE", 400_000, 1_400_000, 64, 1.6),
    Reference("LARGE, LS-960", "LARGE", 250_000, 1_200_000, 128, 2.3),
    Reference("LARGE, LV-60k", "LARGE", 600_000, 1_200_000, 128, 5.2),
)


@dataclass(frozen=True)
class Job:
    """One row of the cost table: a recipe's schedule on a corpus."""

    name: str
    model: str
    step: str  # which counted step one update runs: "pretraining", "fine-tuning" or "inference"
    corpus_hours: float
    updates: int = 0  # 0: one pass over the corpus (inference)
    batch_samples: int = 0  # per GPU
    recipe_gpus: int = 0  # GPUs (x gradient accumulation) of the recipe's effective batch
    frozen_updates: int = 0  # first updates that train only the CTC head

    def audio_per_update(self) -> float:
        """Seconds of audio one update sees: the recipe's batch, or the whole corpus when smaller
        (the other GPUs have nothing to do)."""
        return min(self.batch_samples * self.recipe_gpus / RATE, self.corpus_hours * 3600)

    def busy_gpus(self) -> float:
        """GPUs one update keeps busy at the recipe's per-GPU batch (inference: any number)."""
        return math.inf if not self.updates else math.ceil(self.audio_per_update() * RATE / self.batch_samples)


def jobs() -> list[Job]:
    """The paper's recipes (section 4.2 and appendix B; fairseq's configs in brackets where they differ)."""
    out = [
        # BASE is pretrained on LS-960 only in the paper; on 60 k h the same 400 k updates are assumed.
        Job("pretrain, 960 h", "BASE", "pretraining", 960, 400_000, 1_400_000, 64),
        Job("pretrain, 60 k h", "BASE", "pretraining", 60_000, 400_000, 1_400_000, 64),
        Job("pretrain, 960 h", "LARGE", "pretraining", 960, 250_000, 1_200_000, 128),
        # fairseq's wav2vec2_large_librivox.yaml runs max_update 1 M; the paper reports 600 k.
        Job("pretrain, 60 k h", "LARGE", "pretraining", 60_000, 600_000, 1_200_000, 128),
    ]
    # Fine-tuning: BASE 3.2 M samples x 8 GPUs (1,600 s), LARGE 1.28 M x 24 (1,920 s); 13 k / 13 k / 50 k
    # updates (fairseq's base_100h.yaml: 80 k), the Transformer frozen for the first 10 k on 10 min and 1 h.
    for model, batch, gpus in (("BASE", 3_200_000, 8), ("LARGE", 1_280_000, 24)):
        for name, hours, updates, frozen in (("10 min", 1 / 6, 13_000, 10_000), ("1 h", 1, 13_000, 10_000),
                                             ("100 h", 100, 50_000, 0)):
            out.append(Job(f"fine-tune, {name}", model, "fine-tuning", hours, updates, batch, gpus, frozen))
    out += [Job("transcribe, 10 k h", m, "inference", 10_000) for m in ("BASE", "LARGE")]
    return out


# --------------------------------------------------------------------------- counting
@contextlib.contextmanager
def countable():
    """Plain forwards and SDPA's math backend: every product an aten operator the counter knows."""
    with fast.disabled(), sdpa_kernel(SDPBackend.MATH):
        yield


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each gradient of a convolution (input, weight) costs what its forward costs. PyTorch's own
    formula counts a grouped convolution's weight gradient as if it were ungrouped (``groups`` times
    too many: the positional convolution has 16 groups)."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def count(fn) -> tuple[float, dict[str, float]]:
    """(total FLOPs, FLOPs by module name) of one call of ``fn``."""
    fixes = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with countable(), FlopCounterMode(display=False, depth=None, custom_mapping=fixes) as counter:
        fn()
    by_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    return float(counter.get_total_flops()), by_module


def models(name: str) -> dict:
    """The model of each step: with quantizer (pretraining), with a CTC head (fine-tuning, inference);
    float32, no layerdrop, random weights."""
    torch.manual_seed(0)
    vocab = Vocabulary.from_characters("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")
    cfg = preset(name, layerdrop=0.0)
    ctc = build_model(cfg, vocab=vocab)
    freeze_feature_encoder(ctc)  # the fine-tuning recipe (fairseq feature_grad_mult 0)
    return {"pretrain": build_model(cfg, with_quantizer=True), "ctc": ctc, "vocab": vocab}


def steps(m: dict, seconds: dict[str, float]) -> dict:
    """step name -> (audio seconds, function running one step of one utterance on the CPU)."""
    pre_x = harness.speech(seconds["pretraining"])
    ft_x = harness.speech(seconds["fine-tuning"])
    loss_pre, loss_ft = PretrainingLoss(), CTCFinetuneLoss(m["ctc"], m["vocab"], FinetuneConfig())
    frames = harness.conv_frames(m["ctc"].config, ft_x.shape[1])[-1]
    targets = torch.randint(1, len(m["vocab"]), (1, frames // 4), generator=torch.Generator().manual_seed(0))
    ft_batch = {"waveforms": ft_x, "lengths": torch.tensor([ft_x.shape[1]]), "targets": targets,
                "target_lengths": torch.tensor([targets.shape[1]])}

    def pretrain():
        m["pretrain"].train().zero_grad(set_to_none=True)
        loss_pre(m["pretrain"], {"waveforms": pre_x, "lengths": torch.tensor([pre_x.shape[1]])})[0].backward()

    def finetune(frozen: bool):
        def run():
            set_transformer_trainable(m["ctc"], not frozen)
            m["ctc"].train().zero_grad(set_to_none=True)
            loss_ft(m["ctc"], ft_batch)[0].backward()
        return run

    out = {"pretraining": (pre_x.shape[1] / RATE, pretrain),
           "fine-tuning": (ft_x.shape[1] / RATE, finetune(False)),
           "fine-tuning, Transformer frozen": (ft_x.shape[1] / RATE, finetune(True))}
    for s in seconds["inference"]:
        x = harness.speech(s)
        out[f"inference {s:g} s"] = (s, lambda x=x: m["ctc"].infer(x))
    return out


# --------------------------------------------------------------------------- projection
def step_flops_per_audio_second(counted: dict, model: str, step: str) -> float:
    return counted[model][step][0] / counted[model][step][1]


def job_flops(job: Job, counted: dict) -> tuple[float, float]:
    """(FLOPs, audio seconds processed) of a whole job."""
    if job.step == "inference":
        chunk = counted[job.model][f"inference {CHUNK_SECONDS:g} s"]
        plan = plan_chunks(CHUNK_SECONDS, STRIDE_SECONDS)
        audio = job.corpus_hours * 3600 * plan.chunk / plan.step  # overlapping chunks run their strides twice
        return audio * chunk[0] / chunk[1], audio
    per_update = job.audio_per_update()
    full = step_flops_per_audio_second(counted, job.model, job.step)
    frozen = step_flops_per_audio_second(counted, job.model, "fine-tuning, Transformer frozen") \
        if job.frozen_updates else full
    flops = per_update * (frozen * job.frozen_updates + full * (job.updates - job.frozen_updates))
    return flops, per_update * job.updates


def implied_mfu(ref: Reference, counted: dict) -> tuple[float, float]:
    """(FLOPs of the run, MFU on V100 fp16) of a published pretraining run."""
    flops = ref.updates * ref.batch_samples * ref.gpus / RATE * step_flops_per_audio_second(counted, ref.model,
                                                                                             "pretraining")
    return flops, flops / (ref.gpus * ref.days * 86400 * V100_FP16 * 1e12)


def num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def hours(h: float) -> str:
    """Wall time readable at a glance: minutes, hours or days."""
    if h < 1:
        return f"{h * 60:.0f} min"
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} d"


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny preset in place of BASE and LARGE (tests the script)")
    p.add_argument("--gpu", default="H100 SXM", help="name of the card projected for")
    p.add_argument("--gpu-tflops", type=float, default=H100_BF16, help="its dense bf16 peak, TFLOP/s")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64], help="GPU counts for the wall-time columns")
    p.add_argument("--repeats", type=int, default=1, help="timed CPU steps per row (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the CPU timing")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    presets = {"BASE": "tiny", "LARGE": "tiny"} if args.quick else {"BASE": "base", "LARGE": "large"}
    seconds = {"pretraining": CROP / RATE, "fine-tuning": FT_SECONDS, "inference": INFER_SECONDS}

    counted, count_rows, cpu_rows, cpu_rate = {}, [], [], {}
    peak = harness.matmul_peak(clock="cpu")
    for model, name in presets.items():
        m = models(name)
        counted[model] = {}
        for step, (audio, fn) in steps(m, seconds).items():
            total, by_module = count(fn)
            counted[model][step] = (total, audio)
            # the tree's root is the module called: Wav2Vec2 (forward) or its parts (forward_pretraining)
            ffn = next(v for k, v in by_module.items() if k.endswith("layers.0.feed_forward"))
            analytic = sum(harness.forward_flops(m["ctc"].config, round(audio * RATE)).values())
            count_rows.append([model + (f" ({name})" if args.quick else ""), step, f"{audio:g}",
                               f"{total / 1e9:.4g}", f"{total / audio / 1e9:.4g}", f"{analytic / 1e9:.4g}",
                               f"{ffn / 1e9:.4g}"])
            print(f"[{model} {step}: {total / 1e9:.4g} GFLOP counted]", file=sys.stderr, flush=True)
            if model == "BASE":  # measured: the shipped model (fast path on), this process's CPU time
                t = harness.interleaved({step: fn}, args.repeats, warmup=1, clock="cpu")[step]
                cpu_rate[step] = total / t
                print(f"[{model} {step}: {t:.2f} CPU s]", file=sys.stderr, flush=True)
                cpu_rows.append([model, step, f"{audio:g}", f"{t:.2f}", f"{total / t / 1e9:.1f}",
                                 f"{100 * total / t / 1e9 / peak['fp32']:.0f}%"])
        del m

    mfu_rows, mfu = [], {}
    for ref in REFERENCES:
        flops, u = implied_mfu(ref, counted)
        mfu.setdefault(ref.model, []).append(u)
        mfu_rows.append([ref.name, f"{ref.updates // 1000} k", f"{ref.batch_samples / 1e6:g} M x {ref.gpus}",
                         f"{flops / 1e18:.1f}", f"{ref.gpus} x {ref.days:g} d",
                         f"{flops / (ref.gpus * ref.days * 86400) / 1e12:.1f}",
                         f"{100 * u:.2g}%"])
    train_mfu = {model: sum(us) / len(us) for model, us in mfu.items()}
    infer_mfu = MEASURED_INFER_TFLOPS / H100_BF16

    job_rows = []
    for job in jobs():
        flops, audio = job_flops(job, counted)
        u = infer_mfu if job.step == "inference" else train_mfu[job.model]
        gpu_h = flops / (args.gpu_tflops * 1e12 * u) / 3600
        walls = []
        for n in args.gpus:
            busy = min(n, job.busy_gpus())
            walls.append(hours(gpu_h / busy) + (f" ({busy:.0f} busy)" if busy < n else ""))
        rate = cpu_rate.get("inference 30 s" if job.step == "inference" else job.step, math.nan)
        job_rows.append([job.name, job.model, f"{job.updates // 1000} k" if job.updates else "-",
                         f"{job.audio_per_update():.0f} s" if job.updates else "-",
                         num(audio / 3600 / job.corpus_hours), f"{flops / 1e18:.3g}", f"{100 * u:.2g}%",
                         num(gpu_h), *walls, num(flops / rate / YEAR)])

    plan = plan_chunks(CHUNK_SECONDS, STRIDE_SECONDS)
    print("# What the jobs cost: counted FLOPs and projected GPU time" + (" (quick: tiny preset)" if args.quick else ""))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {args.threads}, "
          f"CPU fp32 matmul peak {peak['fp32']:.0f} GFLOP/s, load average {harness.load_average()}\n")
    print("## Counted (FlopCounterMode, one utterance, batch 1; matrix products and convolutions, forward + backward)\n")
    print(harness.markdown_table(["model", "step", "audio s", "GFLOP counted", "GFLOP per audio s",
                                  "analytic forward GFLOP (harness)", "layer 0 FFN GFLOP"], count_rows))
    print("\n## Training MFU implied by the paper's runs (fairseq, fp16, V100 at "
          f"{V100_FP16:g} TFLOP/s): counted FLOPs of the schedule / (GPUs x days x peak)\n")
    print(harness.markdown_table(["reference run", "updates", "batch (samples x GPUs)", "EFLOP counted",
                                  "V100s x days", "TFLOP/s per GPU", "implied MFU"], mfu_rows))
    print(f"\n## Projection for {args.gpu} ({args.gpu_tflops:g} TFLOP/s bf16): GPU-h = FLOPs / (peak x MFU) / 3600, "
          "wall = GPU-h / GPUs busy")
    print(f"MFU: training, the paper-implied figure of the model; inference, {MEASURED_INFER_TFLOPS:g} TFLOP/s "
          f"measured on an H200 ({100 * infer_mfu:.1f}% of the H100 peak). Transcription runs {CHUNK_SECONDS:g} s "
          f"chunks every {plan.step / RATE:g} s ({plan.chunk / plan.step:.2f}x the audio). CPU core-years at the "
          "rate measured below (BASE's rate for LARGE too).\n")
    print(harness.markdown_table(["job", "model", "updates", "audio per update", "epochs", "EFLOP",
                                  "MFU", f"{args.gpu} GPU-h (projected)",
                                  *(f"wall, {n} GPUs (projected)" for n in args.gpus), "CPU core-years"], job_rows))
    print(f"\n## Measured on this CPU: the shipped model (fast path, fp32), process CPU time, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print(harness.markdown_table(["model", "step", "audio s", "CPU s", "GFLOP/s", "% of fp32 matmul peak"], cpu_rows))


if __name__ == "__main__":
    sys.exit(main())

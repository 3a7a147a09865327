"""The training engine shared by pretraining and fine-tuning.

A task supplies three things:

* ``model`` -- an ``nn.Module`` (a :class:`w2v2.Wav2Vec2` is saved in Hugging Face layout);
* ``loss_fn(model, batch) -> (loss_sum, sample_size, metrics)`` -- ``loss_sum`` is a scalar
  tensor *summed* over the batch's ``sample_size`` units (masked frames, target tokens, ...),
  ``metrics`` a dict of floats that are *means over this batch* (the trainer averages them over
  micro-batches and ranks weighted by ``sample_size``). If it has ``set_step(step)``, that is
  called before every update (Gumbel temperature, freezing schedules); if it has
  ``state_dict()``/``load_state_dict()``, they go into the checkpoint;
* ``make_loader(epoch, skip) -> iterable of batches`` -- the epoch's batches for this rank
  minus the first ``skip`` (see :func:`w2v2.data.make_loader_factory`).

One update = ``accum_steps`` micro-batches per rank: the summed losses are backpropagated, the
sample sizes summed over micro-batches and ranks, and the gradients divided by that global sample
size, so the gradient is the same whatever the number of ranks and micro-batches. Then
non-finite loss or gradient -> the update is skipped (logged, gradients zeroed, weights and
optimizer untouched); else clip, AdamW step, next learning rate (:func:`get_lr`, a pure
function of the update number).

The run directory (``train_config.json``, ``metrics.jsonl``/``.csv`` with one row per update,
``checkpoint_NNNNNNN/`` directories -- the model via ``save_pretrained`` plus ``trainer_state.pt``
and ``checksums.json``, the SHA-256 of both -- and the ``checkpoint_last`` link) is
:mod:`w2v2.runs`. A checkpoint is written in a temporary directory and renamed into place, so a
crash never leaves a partial one; a damaged one (disk error, truncation) is detected on resume
and the previous one used instead (:meth:`Trainer.resume_latest`). Rank 0 holds the run
directory's lock (:class:`w2v2.runs.RunLock`) from construction to the end of training, and on
taking it removes what killed runs left there. Launched by ``torchrun``, the
trainer joins the process group (gloo on CPU, nccl on GPU), wraps the model in
DistributedDataParallel, or with ``fsdp`` shards it with FSDP2 (``fully_shard``), and lets rank 0
alone write; saving is collective (every rank's RNG state, and under FSDP the weights and
optimizer state, are gathered whole into the files one process writes). docs/scale.md has the
launch commands and what a restart does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import DEVICE_HELP, PROGRESS_HELP, option
from .distributed import init_distributed
from .fileio import atomic_open
from .precision import resolve_device
from .runs import (CHECKPOINT_PREFIX, STATE_FILE, MetricLog, RunError, RunLock, checkpoint_dirs,  # noqa: F401
                   last_checkpoint, read_checkpoint, read_metrics, remove_stale_entries, rng_state,
                   seed_everything, set_aside, set_rng_state, write_checkpoint)

log = logging.getLogger(__name__)

# Options that say how a run is watched, saved or bounded in this invocation: changed on resume,
# training still follows the course it would have followed uninterrupted.
_BOOKKEEPING = frozenset({"max_epochs", "max_minutes", "log_interval", "save_interval", "keep_last", "device",
                          "progress", "tensorboard", "find_unused_parameters", "max_consecutive_skips", "sample_rate",
                          "fsdp"})

LossFn = Callable[[nn.Module, object], tuple[Tensor, "int | float | Tensor", dict]]
LoaderFactory = Callable[[int, int], Iterable]


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping options (the model's architecture lives in ``ModelConfig``)."""

    lr: float = option(5e-4, "peak learning rate")
    schedule: str = option("polynomial", "learning-rate schedule", choices=("polynomial", "tri_stage", "constant"))
    warmup_updates: int = option(32_000, "linear warm-up from 0 (polynomial and constant schedules)")
    end_lr: float = option(0.0, "learning rate at max_updates (polynomial schedule)")
    power: float = option(1.0, "exponent of the polynomial decay (1: linear)")
    tri_stage_ratios: tuple[float, float, float] = option(
        (0.1, 0.4, 0.5), "tri_stage schedule: fractions of the run spent warming up, holding, decaying",
        metavar=("WARMUP", "HOLD", "DECAY"))
    init_lr_scale: float = option(0.01, "tri_stage schedule: warm-up starts at lr times this")
    final_lr_scale: float = option(0.05, "tri_stage schedule: decay ends at lr times this")
    max_updates: int = option(400_000, "stop after this many updates")
    max_epochs: int | None = option(None, "stop after this many passes over the data")
    max_minutes: float | None = option(None, "stop (and save) after this many minutes of training in this invocation")
    # "time" serves "train for 8 minutes" budgets whose update count is not known in advance; the
    # whole run's training time counts (kept across resumes).
    schedule_clock: str = option("updates", "run the learning-rate schedule over max_updates, or over max_minutes of "
                                            "training time (a fixed time budget; not bit-reproducible)",
                                 choices=("updates", "time"))
    accum_steps: int = option(1, "micro-batches per update and process (fairseq update_freq)")
    clip_norm: float = option(0.0, "clip the gradient norm to this; 0: no clipping (the norm is still logged)")
    betas: tuple[float, float] = option((0.9, 0.98), "Adam betas")
    eps: float = option(1e-6, "Adam epsilon")
    weight_decay: float = option(0.01, "AdamW weight decay")
    precision: str = option("fp32", "training arithmetic: fp32, or autocast to bf16 (CPU or GPU) or fp16 (GPU, "
                                    "with gradient scaling), faster but with other numerics; unlike inference, "
                                    "never chosen automatically", choices=("fp32", "bf16", "fp16"))
    log_interval: int = option(10, "updates between console lines (the metric files get every update)")
    save_interval: int = option(1000, "updates between checkpoints (and one at the end)")
    keep_last: int = option(3, "checkpoints kept (0: all)")
    seed: int = option(1, "random seed (initialisation, batches, masks, dropout)")
    device: str = option("auto", DEVICE_HELP)
    sample_rate: int = option(16000, "audio samples per second, to report audio seconds per second")
    progress: bool = option(True, PROGRESS_HELP)
    tensorboard: bool = option(False, "also write TensorBoard logs")
    find_unused_parameters: bool = option(False, "DistributedDataParallel: let some parameters get no gradient "
                                                 "(layerdrop, freezing)")
    fsdp: bool = option(False, "with several processes, shard parameters, gradients and optimizer state across them "
                               "(FSDP2 fully_shard) instead of a full copy on each (DDP): for models that do not "
                               "fit one GPU; checkpoints are the same files either way")
    max_consecutive_skips: int = option(50, "stop with an error after this many updates in a row with non-finite "
                                            "values")

    def __post_init__(self) -> None:
        self.tri_stage_ratios = tuple(self.tri_stage_ratios)
        self.betas = tuple(self.betas)
        problems = []  # all of them at once
        if self.schedule not in ("polynomial", "tri_stage", "constant"):
            problems.append(f"schedule must be polynomial, tri_stage or constant, got {self.schedule!r}")
        if self.schedule_clock not in ("updates", "time"):
            problems.append(f"schedule_clock must be updates or time, got {self.schedule_clock!r}")
        if self.schedule_clock == "time" and not self.max_minutes:
            problems.append("schedule_clock time needs max_minutes (the time the schedule runs over)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            problems.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.fsdp and self.precision == "fp16":  # GradScaler is not made for sharded gradients
            problems.append("fsdp needs precision fp32 or bf16, not fp16")
        if self.accum_steps < 1 or self.max_updates < 0:
            problems.append("accum_steps must be >= 1 and max_updates >= 0")
        if self.save_interval < 1 or self.log_interval < 1:
            problems.append(f"save_interval and log_interval must be >= 1, got {self.save_interval} and "
                            f"{self.log_interval}")
        if self.lr < 0 or self.warmup_updates < 0 or self.keep_last < 0 or self.clip_norm < 0:
            problems.append("lr, warmup_updates, keep_last and clip_norm must not be negative")
        if self.max_epochs is not None and self.max_epochs < 1:
            problems.append(f"max_epochs must be >= 1 (or null), got {self.max_epochs}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- schedules


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update ``step`` (0 = the first update)."""
    if cfg.schedule == "tri_stage":
        return _tri_stage(step, cfg)
    warmup = cfg.warmup_updates
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if step >= cfg.max_updates:
        return cfg.end_lr
    remaining = 1.0 - (step - warmup) / max(1, cfg.max_updates - warmup)
    return cfg.end_lr + (cfg.lr - cfg.end_lr) * remaining ** cfg.power


def _tri_stage(step: int, cfg: TrainConfig) -> float:
    """fairseq ``tri_stage``: linear warm-up from ``lr * init_lr_scale``, hold at ``lr``,
    exponential decay to ``lr * final_lr_scale``; stays there after ``max_updates``."""
    warmup, hold, decay = (int(r * cfg.max_updates) for r in cfg.tri_stage_ratios)
    if step < warmup:
        start = cfg.lr * cfg.init_lr_scale
        return start + (cfg.lr - start) * step / warmup
    step -= warmup
    if step < hold:
        return cfg.lr
    step -= hold
    if step < decay:
        return cfg.lr * math.exp(math.log(cfg.final_lr_scale) * step / decay)
    return cfg.lr * cfg.final_lr_scale


def effective_batch(batch_samples: int, accum_steps: int, world_size: int, sample_rate: int = 16000) -> str:
    """The line the trainer starts with: the most audio one update can see, ``batch_samples``
    (max_tokens) x ``accum_steps`` x ``world_size``. An upper bound: it counts padding, and
    batches are rarely full (the figure measured at the first update follows)."""
    samples = batch_samples * accum_steps * world_size
    return (f"effective batch: {samples / sample_rate / 3600:.3g} hours of audio per update at most "
            f"({batch_samples} samples x {accum_steps} micro-batches x {world_size} processes = {samples} samples)")


# ---------------------------------------------------------------------------- the trainer


class _LossModule(nn.Module):
    """Puts ``loss_fn(model, batch)`` inside ``forward`` so DDP sees (and syncs) every call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def _fully_shard(module: nn.Module, model: nn.Module) -> None:
    """FSDP2: each Transformer layer its own unit (its whole parameters exist only while it runs),
    the rest with ``module``, the root whose forward runs the loss."""
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(getattr(model, "encoder", None), "layers", ()):
        fully_shard(layer)
    fully_shard(module)


def _full(t):
    """A sharded tensor (DTensor) gathered whole, other values as they are. A collective: every
    rank calls it for the same tensors in the same order."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gathered(state, keep: bool):
    """``state`` (a nested dict/list) with its sharded tensors gathered whole, on the CPU where
    ``keep`` (rank 0, which writes), else dropped as soon as gathered (bounded memory)."""
    if isinstance(state, dict):
        return {k: _gathered(v, keep) for k, v in state.items()}
    if isinstance(state, list):
        return [_gathered(v, keep) for v in state]
    if isinstance(state, Tensor):
        full = _full(state)
        return full.detach().cpu() if keep else None
    return state


def _shard_like(full, like):
    """``full`` cut into this rank's shard of ``like`` when ``like`` is sharded and the shapes
    agree (a collective, see :func:`_full`); else ``full`` as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor) and isinstance(full, Tensor) and full.shape == like.shape:
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full


def _to_device(batch, device: torch.device):
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class _Stop(Exception):
    pass


class Trainer:
    """Runs updates until ``cfg.max_updates`` (or ``max_epochs``), saving and logging as it goes.

    ``hooks``: callables ``hook(trainer, row)`` run after each update on every rank (``row`` is the
    logged metrics dict; ``trainer.info.is_main`` says whether this rank writes) -- e.g. a
    validation pass every N updates. ``extra_state``: a JSON-able dict saved in every checkpoint
    (``trainer.extra_state`` is restored on resume).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, make_loader: LoaderFactory, cfg: TrainConfig,
                 run_dir: str | os.PathLike, *, hooks: Iterable[Callable] = (), extra_state: dict | None = None,
                 batch_samples: int | None = None):
        self.cfg = cfg
        self.batch_samples = batch_samples  # the most audio samples of one micro-batch (max_tokens): for the log
        # resolved once: every checkpoint path derives from it, so one checkpoint has one path
        self.run_dir = Path(run_dir).resolve()
        self.device = resolve_device(cfg.device)  # under torchrun, the GPU of this process's local rank
        self.info = init_distributed(self.device)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a GPU (GradScaler); on CPU use bf16 or fp32")
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.make_loader = make_loader
        self.hooks = list(hooks)
        self.extra_state = dict(extra_state or {})
        self.module: nn.Module = _LossModule(self.model, loss_fn)
        encoder = getattr(self.model, "encoder", None)
        self._layerdrop = torch.Generator() if getattr(encoder, "layerdrop", 0) > 0 else None
        if self._layerdrop is not None:
            encoder.layerdrop_generator = self._layerdrop
        self.sharded = cfg.fsdp and self.info.world_size > 1
        if self.sharded:
            _fully_shard(self.module, self.model)
        elif self.info.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DDP(self.module, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters)
        # fused AdamW: one kernel over all parameters instead of a loop over tensors (also transformers'
        # Trainer default); docs/performance.md has its cost on a CPU
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.step = 0  # updates done
        self.epoch = 0
        self.batches_in_epoch = 0  # this rank's batches consumed in the current epoch
        self.skipped = 0
        self.skipped_files = 0  # unusable files the loader passed over, over the whole run
        self._consecutive_skips = 0
        self._stop_local = False  # this rank wants to stop (signal, time limit)
        self._stop_agreed = False  # every rank stops after this update
        self._started = time.monotonic()
        self._first_step = 0  # self.step when this invocation's training began (its pace: progress bar)
        self._seconds_before = 0.0  # training time of the run's earlier invocations (from the checkpoint)
        self._resumed_from: Path | None = None
        self._iter = None
        self._metrics: MetricLog | None = None
        self._bar = None  # the progress bar while training, on rank 0
        self._epoch_batches: int | None = None  # this rank's batches in an epoch, once a loader said
        self._lock = RunLock(self.run_dir)
        if self.info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file of that name, a parent that is a file, no permission
                raise RunError(f"{run_dir}: cannot be the run directory ({e.strerror})") from e
            self._lock.acquire()  # before anything is written or cleaned up in the run directory
            weakref.finalize(self, self._lock.release)
            remove_stale_entries(self.run_dir)
        if self.info.world_size > 1:
            self._check_shared_run_dir()

    def _check_shared_run_dir(self) -> None:
        """Every rank must see the run directory rank 0 writes: on resume each one reads the
        checkpoint, and after a restart rank 0 may be on another node. Checked by reading back
        the holder that rank 0 wrote into the lock file, so that a node-local ``--out`` is an
        error on every rank at the start instead of a failed resume hours later."""
        holder = [self._lock.path.read_text().strip() if self.info.is_main and self._lock.path.exists() else None]
        dist.broadcast_object_list(holder, src=0)
        seen = holder[0]
        if holder[0] and not self.info.is_main:
            try:
                seen = self._lock.path.read_text().strip()
            except OSError:
                seen = None
        flag = torch.tensor([float(seen != holder[0])], device=self.device)
        dist.all_reduce(flag)
        if flag.item() > 0:
            raise RunError(f"{self.run_dir}: not the same directory on every node ({flag.item():.0f} of "
                           f"{self.info.world_size} processes do not see what rank 0 writes there); put the run "
                           "directory on storage that every node mounts at the same path")

    # ------------------------------------------------------------------ data
    def _next_batch(self):
        """Next micro-batch, moving to the next epoch when one runs out."""
        while True:
            if self._iter is None:
                if self.cfg.max_epochs is not None and self.epoch >= self.cfg.max_epochs:
                    raise _Stop
                loader = self.make_loader(self.epoch, self.batches_in_epoch)
                with contextlib.suppress(TypeError):  # a loader without a length: no epoch-based progress
                    self._epoch_batches = self.batches_in_epoch + len(loader)
                self._iter = iter(loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                if self.batches_in_epoch == 0:
                    raise RuntimeError("the data loader yields no batches: no usable audio, or max_tokens too small")
                self._iter = None
                self.epoch += 1
                self.batches_in_epoch = 0
                continue
            self.batches_in_epoch += 1
            return batch

    # ------------------------------------------------------------------ one update
    def _autocast(self):
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward_backward(self, batches: list) -> dict:
        """Backpropagate the summed losses of ``batches`` (this rank's micro-batches) and divide
        the gradients by the global sample size. Returns the reduced statistics."""
        sums = {}  # metric name -> sum of value * sample_size (this rank)
        loss_total, size_total, audio_samples, skipped_files = 0.0, 0.0, 0.0, 0.0
        for i, batch in enumerate(batches):
            if self._layerdrop is not None:
                # layerdrop skips the same layers on every rank: under FSDP a layer is a unit whose
                # gradient exchange every rank must join or skip together
                self._layerdrop.manual_seed((self.cfg.seed * 1_000_003 + self.step) * self.cfg.accum_steps + i)
            sync = i == len(batches) - 1 or not hasattr(self.module, "no_sync")
            ctx = contextlib.nullcontext() if sync else self.module.no_sync()
            with ctx:
                with self._autocast():
                    loss, sample_size, metrics = self.module(_to_device(batch, self.device))
                self.scaler.scale(loss.float()).backward()
            size = float(sample_size)
            loss_total += float(loss.detach())
            size_total += size
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * size
            if isinstance(batch, dict) and "lengths" in batch:
                audio_samples += float(batch["lengths"].sum())
            if isinstance(batch, dict):  # unusable files the loader passed over (data.AudioDataset)
                skipped_files += float(batch.get("skipped_files", 0))
        names = sorted(sums)
        stats = torch.tensor([loss_total, size_total, audio_samples, float(self._stop_local),
                              float(not math.isfinite(loss_total)), skipped_files] + [sums[k] for k in names],
                             dtype=torch.float64, device=self.device if self.info.world_size > 1 else "cpu")
        if self.info.world_size > 1:  # (float64 on the device only where needed: Apple MPS has none)
            dist.all_reduce(stats)
        stats = stats.tolist()
        loss_total, size_total, audio_samples, stop, nonfinite, skipped_files = stats[:6]
        # gradients now hold sum-loss gradients (averaged over ranks by DDP): make them per-unit
        self.scaler.unscale_(self.optimizer)
        factor = self.info.world_size / max(size_total, 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)
        out = {"loss": loss_total / max(size_total, 1.0), "sample_size": size_total,
               "audio_seconds": audio_samples / self.cfg.sample_rate, "stop": stop > 0, "nonfinite_loss": nonfinite > 0,
               "skipped_files": int(skipped_files)}
        out.update({k: v / max(size_total, 1.0) for k, v in zip(names, stats[6:])})
        return out

    def _grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.clip_norm if self.cfg.clip_norm > 0 else float("inf")
        if not params:
            return 0.0
        # sharded gradients give the norm as a DTensor of per-rank parts: the whole one is the sum
        return float(_full(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def train_step(self) -> dict:
        """One update: micro-batches, backward, (skip | clip + step), next learning rate."""
        if hasattr(self.loss_fn, "set_step"):
            self.loss_fn.set_step(self.step)
        lr = get_lr(self._schedule_step(), self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.module.train()
        start = time.perf_counter()
        batches = [self._next_batch() for _ in range(self.cfg.accum_steps)]
        stats = self.forward_backward(batches)
        grad_norm = self._grad_norm()
        skip = stats["nonfinite_loss"] or not math.isfinite(grad_norm)
        if skip:
            self.scaler.update()  # fp16: lowers the scale; no-op otherwise
            self.skipped += 1
            self._consecutive_skips += 1
            log.warning("update %d skipped: non-finite %s", self.step + 1,
                        "loss" if stats["nonfinite_loss"] else "gradient")
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._consecutive_skips = 0
            self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        row = {"update": self.step, "epoch": self.epoch, "lr": lr, "grad_norm": grad_norm,
               "loss": stats["loss"], "skipped": int(skip)}
        self.skipped_files += stats["skipped_files"]
        row.update({k: v for k, v in stats.items() if k not in ("loss", "stop", "nonfinite_loss", "audio_seconds")})
        row.update({"audio_seconds": stats["audio_seconds"], "seconds": elapsed,
                    "audio_sec_per_sec": stats["audio_seconds"] / max(elapsed, 1e-9)})
        if self.cfg.precision == "fp16":
            row["loss_scale"] = float(self.scaler.get_scale())
        self._stop_agreed = stats["stop"]  # several processes stop together, after the update that carried a request
        if self._consecutive_skips >= self.cfg.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} updates in a row had non-finite loss or gradients: "
                               "training diverged; lower the learning rate or use fp32/bf16")
        return row

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, optimizer: dict | None = None, rank_rng: list | None = None) -> dict:
        """The trainer state of a checkpoint; ``optimizer``: the optimizer's, gathered whole
        (under FSDP); ``rank_rng``: every rank's RNG state, in rank order (several processes)."""
        state = {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "skipped": self.skipped, "skipped_files": self.skipped_files,
                 "optimizer": self.optimizer.state_dict() if optimizer is None else optimizer,
                 "scaler": self.scaler.state_dict(), "rng": rng_state(), "train_config": self.cfg.to_dict(),
                 "extra": json.dumps(self.extra_state), "train_seconds": self._elapsed_total(),
                 "world_size": self.info.world_size}
        if rank_rng is not None:
            state["rank_rng"] = rank_rng
        if hasattr(self.loss_fn, "state_dict"):
            state["loss_fn"] = self.loss_fn.state_dict()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint_<step>`` atomically (temp dir, checksums, fsync, rename), repoint
        ``checkpoint_last``, drop the oldest beyond ``keep_last`` (:func:`w2v2.runs.write_checkpoint`).
        Every rank calls it: with several processes each one's RNG state is gathered (masks,
        dropout and crops differ per rank, so an exact resume needs them all), under FSDP the
        weights and optimizer state too; rank 0 alone writes, the same files as one process."""
        rank_rng = weights = optimizer = None
        if self.info.world_size > 1:
            rank_rng = [None] * self.info.world_size if self.info.is_main else None
            dist.gather_object(rng_state(), rank_rng, dst=0)
        if self.sharded:
            weights = _gathered(self.model.state_dict(), self.info.is_main)
            optimizer = _gathered(self.optimizer.state_dict(), self.info.is_main)
        if not self.info.is_main:
            return None
        return write_checkpoint(self.run_dir, self.step, self.model, lambda: self.state_dict(optimizer, rank_rng),
                                self.cfg.keep_last, resumed_from=self._resumed_from, weights=weights)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore weights, optimizer, scaler, RNG states and data position (every rank).
        A missing, truncated or corrupted file raises :class:`w2v2.checkpoint.CheckpointError`."""
        path = Path(path).resolve()
        self._restore(path, *read_checkpoint(path, self.model))

    def _restore(self, path: Path, state: dict, weights: dict[str, Tensor]) -> None:
        from .checkpoint import CheckpointError

        optimizer = state["optimizer"]
        if self.sharded:  # whole tensors in the file, this rank's shards in the model and optimizer
            current = self.model.state_dict()
            weights = {k: _shard_like(v, current.get(k)) for k, v in weights.items()}
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            optimizer = {**optimizer, "state": {
                i: {k: _shard_like(v, params[i] if isinstance(i, int) and i < len(params) else None)
                    for k, v in s.items()} for i, s in optimizer["state"].items()}}
        try:
            self.model.load_state_dict(weights, strict=True)
        except RuntimeError as e:  # another architecture: a user error, not a damaged file
            raise CheckpointError(f"{path}: holds weights of a different model than this run's "
                                  f"({str(e).splitlines()[0]}); resume with the run's own configuration") from e
        self.model.to(self.device)
        self.optimizer.load_state_dict(optimizer)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch, self.skipped = state["batches_in_epoch"], state["skipped"]
        self.skipped_files = int(state.get("skipped_files", 0))
        saved_world = int(state.get("world_size", self.info.world_size))  # older checkpoints did not say
        rank_rng = state.get("rank_rng")
        self.extra_state = json.loads(state.get("extra", "{}"))
        self._seconds_before = float(state.get("train_seconds", 0.0))
        if "loss_fn" in state and hasattr(self.loss_fn, "load_state_dict"):
            self.loss_fn.load_state_dict(state["loss_fn"])
        world = self.info.world_size
        set_rng_state(rank_rng[self.info.rank] if rank_rng and len(rank_rng) == world else state["rng"])
        if saved_world != world:
            # batches_in_epoch counts one rank's batches: the same share of the epoch at the new width
            self.batches_in_epoch = -(-self.batches_in_epoch * saved_world // world)
            if self.info.is_main:
                log.warning("%s was saved by %d processes and resumes with %d: the data order and random draws "
                            "from here on differ from the uninterrupted run's (up to %d batches of this epoch are "
                            "skipped or repeated)", path.name, saved_world, world, max(saved_world, world))
        self._iter = None
        self._resumed_from = path
        self._warn_changed_options(path, state.get("train_config"))
        log.info("resumed from %s at update %d (epoch %d, batch %d)", path, self.step, self.epoch,
                 self.batches_in_epoch)

    def _warn_changed_options(self, path: Path, saved) -> None:
        """Resuming with other training options is allowed (a longer run, a lower learning rate),
        but the result then differs from an uninterrupted run's: say which options changed."""
        if not isinstance(saved, dict):
            return
        plain = json.loads(json.dumps(self.cfg.to_dict()))  # tuples as lists, like the saved ones
        ignored = _BOOKKEEPING - ({"max_minutes"} if self.cfg.schedule_clock == "time" else set())
        changed = [f"{k} {saved[k]!r} -> {v!r}" for k, v in plain.items()
                   if k in saved and k not in ignored and json.loads(json.dumps(saved[k])) != v]
        if changed and self.info.is_main:
            log.warning("resuming %s with other training options than it was trained with (%s): training "
                        "goes on, but no longer as the uninterrupted run would have", path.name, ", ".join(changed))

    def resume_latest(self) -> Path | None:
        """Restore the newest intact checkpoint of the run directory (None when there is none).

        A damaged newest checkpoint (missing, truncated or corrupted file) is not fatal: a warning
        names it, it is renamed ``<name>.corrupt`` (kept for inspection, never used or deleted
        again) and the previous one is used; resuming from it is just as exact, only earlier.
        If every checkpoint is damaged, :class:`w2v2.checkpoint.CheckpointError` lists them."""
        from .checkpoint import CheckpointError

        newest = last_checkpoint(self.run_dir)
        candidates = [newest] if newest is not None else []
        candidates += [p for p in reversed(checkpoint_dirs(self.run_dir)) if p != newest]
        damaged: list[tuple[Path, CheckpointError]] = []
        for path in candidates:
            try:
                state, weights = read_checkpoint(path, self.model)
            except CheckpointError as e:
                log.warning("checkpoint %s is damaged: %s", path.name, e)
                damaged.append((path, e))
                continue
            self._restore(path, state, weights)
            if damaged and self.info.is_main:
                for aside in set_aside([bad for bad, _ in damaged], instead=path):
                    log.warning("resumed from the earlier %s instead; the damaged one is now %s", path.name, aside.name)
            return path
        if damaged:
            raise CheckpointError(f"{self.run_dir}: no intact checkpoint to resume from; "
                                  + "; ".join(str(e) for _, e in damaged))
        return None

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame) -> None:
        if self._stop_local:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        log.warning("%s received: finishing this update, saving, then exiting (again to abort)",
                    signal.Signals(signum).name)
        self._stop_local = True

    @contextlib.contextmanager
    def _signals(self):
        import threading
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def train(self, resume: bool | str | os.PathLike = False) -> dict:
        """Train until ``max_updates``; returns ``{"step", "stopped_early", "checkpoint", "skipped_files"}``.

        ``resume``: True continues from ``run_dir/checkpoint_last`` when there is one (else a
        fresh start), a path continues from that checkpoint directory."""
        if self.info.is_main:
            self._lock.acquire()  # again, when this trainer trains a second time
        try:
            return self._train(resume)
        finally:
            self._lock.release()

    def _train(self, resume: bool | str | os.PathLike) -> dict:
        seed_everything(self.cfg.seed)
        ckpt = None
        if resume:
            if isinstance(resume, bool):
                ckpt = self.resume_latest()
            else:
                ckpt = Path(resume)
                self.load_checkpoint(ckpt)
            if ckpt is None:
                log.info("no checkpoint in %s: starting from scratch", self.run_dir)
        if self.info.is_main:
            try:
                with atomic_open(self.run_dir / "train_config.json") as f:
                    json.dump(self.cfg.to_dict(), f, indent=2)
                self._metrics = MetricLog(self.run_dir, self.step if ckpt else None, self.cfg.tensorboard)
            except OSError as e:  # disk full, no permission: before any update
                raise RunError(f"{e.filename or self.run_dir}: cannot write ({e.strerror or e})") from e
        self._started, self._first_step = time.monotonic(), self.step
        if self.info.is_main and self.batch_samples:
            log.info("%s", effective_batch(self.batch_samples, self.cfg.accum_steps, self.info.world_size,
                                           self.cfg.sample_rate))
        bar = self._bar = self._progress_bar()
        stopped_early = False
        try:
            with self._signals():
                while self.step < self.cfg.max_updates:
                    row = self.train_step()
                    self._after_update(row, bar)
                    if self._time_is_up() and not self._stop_local:
                        log.info("time limit of %g minutes reached: stopping", self.cfg.max_minutes)
                        self._stop_local = True
                    if self._stop_agreed if self.info.world_size > 1 else self._stop_local:
                        stopped_early = True
                        break
        except _Stop:
            pass
        finally:
            if bar is not None:
                bar.close()
        for hook in self.hooks:  # e.g. a last validation, whose outcome the final checkpoint records
            if hasattr(hook, "at_end"):
                hook.at_end(self)
        path = self.save_checkpoint()
        if self._metrics is not None:
            self._metrics.close()
        self._iter = None
        if self.skipped_files and self.info.is_main:
            log.warning("%d unusable file(s) were skipped during training (their warnings name them)",
                        self.skipped_files)
        return {"step": self.step, "stopped_early": stopped_early, "checkpoint": path,
                "skipped_files": self.skipped_files}

    def _time_is_up(self) -> bool:
        left = self._seconds_left()
        return left is not None and left <= 0

    def _elapsed_total(self) -> float:
        """Training seconds of the whole run so far (earlier invocations included)."""
        return self._seconds_before + time.monotonic() - self._started

    def _schedule_step(self) -> int:
        """The step the learning-rate schedule is at: the update count, or with the time clock the
        same fraction of ``max_updates`` as the fraction of ``max_minutes`` spent."""
        if self.cfg.schedule_clock != "time":
            return self.step
        fraction = min(1.0, self._elapsed_total() / (60 * self.cfg.max_minutes))
        if self.info.world_size > 1:  # every rank must use rank 0's learning rate
            t = torch.tensor([fraction], dtype=torch.float64, device=self.device)
            dist.broadcast(t, src=0)
            fraction = float(t)
        return int(fraction * self.cfg.max_updates)

    def _after_update(self, row: dict, bar) -> None:
        if self.info.is_main:
            self._metrics.write(row)
            if self.step == self._first_step + 1 and not row["skipped"]:
                log.info("effective batch: %.3g hours of audio per update (measured at update %d, padding and "
                         "crops excluded; every update's is audio_seconds in metrics.jsonl)",
                         row["audio_seconds"] / 3600, self.step)
            if bar is not None:
                bar.total = self._projected_updates()
                bar.n = self.step
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "lr") if k in row}, refresh=False)
                bar.refresh()
            if self.step % self.cfg.log_interval == 0 and not row["skipped"]:
                log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        for hook in self.hooks:
            hook(self, row)
        if not row["skipped"] and self.step % self.cfg.save_interval == 0 and self.step < self.cfg.max_updates:
            self.save_checkpoint()

    def _seconds_left(self) -> float | None:
        """Training time left before the time budget stops the run (None: no time budget): the
        whole run's with the time clock, this invocation's with the updates clock."""
        if self.cfg.max_minutes is None:
            return None
        spent = self._elapsed_total() if self.cfg.schedule_clock == "time" else time.monotonic() - self._started
        return max(0.0, 60 * self.cfg.max_minutes - spent)

    def _projected_updates(self) -> int | None:
        """The update the run will stop at: ``max_updates``, or the one ``max_epochs`` or a time
        budget ends it at when that comes first (the time budget's projected at this invocation's
        pace; None before there is a pace). The progress bar counts to it, so its ETA is the time
        the run actually has left."""
        total = self.cfg.max_updates
        if self.cfg.max_epochs is not None and self._epoch_batches is not None:
            batches_left = (self.cfg.max_epochs - self.epoch) * self._epoch_batches - self.batches_in_epoch
            total = min(total, self.step + max(0, batches_left) // self.cfg.accum_steps)
        left = self._seconds_left()
        if left is None:
            return total
        done, seconds = self.step - self._first_step, time.monotonic() - self._started
        if done <= 0 or seconds <= 0:
            return None
        return min(total, self.step + int(left * done / seconds))

    def _progress_bar(self):
        if not (self.cfg.progress and self.info.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=self._projected_updates(), initial=self.step, unit="upd", dynamic_ncols=True)

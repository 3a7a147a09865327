"""Self-supervised pretraining: the wav2vec 2.0 objective as a ``loss_fn`` for :class:`w2v2.trainer.Trainer`.

One step, for a batch of waveforms (batch, samples) with lengths::

    frame lengths  -> compute_mask_indices   -> mask (batch, frames), ~49% of valid frames
    mask           -> sample_negatives       -> K distractor frames per masked frame, same utterance
    model.forward_pretraining(wav, lengths, mask) -> projected context C' and quantized targets Q'
    contrastive_logits(C'[mask], Q'[mask], Q'[negatives], kappa)  (cosine / 0.1, neg_is_pos -> -inf)
    total = contrastive_sum + (0.1 * diversity + 10 * feature_penalty) * n_masked

The trainer divides by the number of masked frames (the sample size). Presets bundle the model
architecture, optimisation, loss and data options of a run (:class:`RunConfig`, from
:func:`preset_config`); a JSON file can override any of them (:func:`load_run_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import config as model_presets
from .config import ConfigError, ModelConfig, check_fields, option, valid_fields
from .formats.shards import ShardCatalog
from .losses import codebook_perplexity, contrastive_logits, pretraining_loss
from .masking import compute_mask_indices, gather_masked, gather_negatives, sample_negatives
from .model import Wav2Vec2
from .trainer import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class PretrainingLossConfig:
    """The options of the pretraining objective (masking, negatives, loss weights, Gumbel schedule,
    feature-encoder gradient); defaults are the BASE recipe of the paper / fairseq."""

    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    num_negatives: int = 100
    logit_temp: float = 0.1  # kappa
    diversity_weight: float = 0.1  # alpha
    penalty_weight: float = 10.0  # L2 penalty on the feature encoder output
    feature_grad_scale: float = 0.1  # gradient into the feature encoder
    gumbel_start: float = 2.0
    gumbel_end: float = 0.5
    gumbel_decay: float = 0.999995  # per update

    def __post_init__(self) -> None:
        problems = [f"{name} must lie in [0, 1], got {v}" for name, v in (("mask_prob", self.mask_prob),)
                    if not 0 <= v <= 1]
        if self.mask_length < 1 or self.num_negatives < 1 or self.min_masks < 0:
            problems.append("mask_length and num_negatives must be >= 1, min_masks >= 0")
        if self.logit_temp <= 0 or not 0 < self.gumbel_end <= self.gumbel_start or not 0 < self.gumbel_decay <= 1:
            problems.append("logit_temp must be positive, 0 < gumbel_end <= gumbel_start, 0 < gumbel_decay <= 1")
        if problems:
            raise ValueError("; ".join(problems))


def gumbel_temperature(step: int, cfg: PretrainingLossConfig) -> float:
    """``max(start * decay ** step, end)``: 2 -> 0.5 by x0.999995 per update for BASE."""
    return max(cfg.gumbel_start * cfg.gumbel_decay ** step, cfg.gumbel_end)


def pretraining_step(model: Wav2Vec2, waveforms: Tensor, lengths: Tensor | None, mask: Tensor,
                     negatives: Tensor, cfg: PretrainingLossConfig) -> dict:
    """Losses for a given mask (batch, frames) and negatives (batch, n, K): the deterministic core.

    Returns :func:`w2v2.losses.pretraining_loss`'s dict (``total``, ``contrastive``, ``diversity``,
    ``penalty``, ``accuracy``, ``n_masked``) plus ``prob_perplexity``, ``code_perplexity``, the
    contrastive ``logits`` (batch, n, 1 + K) and the model output ``out``.
    """
    out = model.forward_pretraining(waveforms, lengths, mask)
    targets = out.projected_quantized  # (batch, frames, dim)
    logits = contrastive_logits(gather_masked(out.projected_context, mask), gather_masked(targets, mask),
                                gather_negatives(targets, negatives), cfg.logit_temp)  # (batch, n, 1 + K)
    probs = out.code_probs.flatten(0, 1)  # (batch * frames, G, V)
    prob_ppl = codebook_perplexity(probs, mask)
    groups, num_vars = probs.shape[1], probs.shape[2]
    with torch.no_grad():
        hard = F.one_hot(out.code_indices.flatten(0, 1), num_vars).float()  # (batch * frames, G, V)
        code_ppl = codebook_perplexity(hard, mask)
    result = pretraining_loss(logits, prob_ppl, groups, num_vars, out.features_pen,
                              cfg.diversity_weight, cfg.penalty_weight)
    result.update(prob_perplexity=prob_ppl, code_perplexity=code_ppl, logits=logits, out=out)
    return result


class PretrainingLoss:
    """``loss_fn(model, batch) -> (total_sum, n_masked, metrics)`` for the trainer.

    Draws the mask and negatives with the global torch RNG (restored on resume), sets the Gumbel
    temperature for the current update (``set_step``) and the feature encoder's gradient scale.
    Metrics are per masked frame and add up: ``loss = contrastive + diversity + penalty`` (the
    last two weighted), plus ``accuracy`` (positive wins), ``prob_perplexity``,
    ``code_perplexity`` (of the hard choices), ``gumbel_temp`` and ``mask_fraction``.
    """

    def __init__(self, cfg: PretrainingLossConfig | None = None):
        self.cfg = cfg or PretrainingLossConfig()
        self.temperature = gumbel_temperature(0, self.cfg)

    def set_step(self, step: int) -> None:
        self.temperature = gumbel_temperature(step, self.cfg)

    def make_mask(self, model: Wav2Vec2, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(mask (batch, frames) bool, negatives (batch, n, K)) on the CPU."""
        flen = model.num_frames(lengths.cpu())
        frames = int(model.num_frames(torch.tensor([waveforms.shape[1]]))[0])
        mask = compute_mask_indices((waveforms.shape[0], frames), self.cfg.mask_prob, self.cfg.mask_length,
                                    lengths=flen, min_masks=self.cfg.min_masks)
        return mask, sample_negatives(mask, self.cfg.num_negatives)

    def __call__(self, model: Wav2Vec2, batch: dict) -> tuple[Tensor, int, dict]:
        model.feature_grad_scale = self.cfg.feature_grad_scale
        model.quantizer.temperature = self.temperature
        wav, lengths = batch["waveforms"], batch["lengths"]
        mask, negatives = self.make_mask(model, wav, lengths)
        r = pretraining_step(model, wav, lengths, mask.to(wav.device), negatives.to(wav.device), self.cfg)
        n = r["n_masked"]
        valid_frames = float(model.num_frames(lengths.cpu()).sum())
        metrics = {
            "contrastive": float(r["contrastive"].detach()) / n,
            "diversity": self.cfg.diversity_weight * float(r["diversity"].detach()),
            "penalty": self.cfg.penalty_weight * float(r["penalty"].detach()),
            "accuracy": float(r["accuracy"]) / n,
            "prob_perplexity": float(r["prob_perplexity"].detach()),
            "code_perplexity": float(r["code_perplexity"]),
            "gumbel_temp": self.temperature,
            "mask_fraction": n / valid_frames,
        }
        return r["total"], n, metrics

    def state_dict(self) -> dict:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.temperature = float(state["temperature"])


# ---------------------------------------------------------------------------- run presets


@dataclass
class DataConfig:
    max_tokens: int = option(1_400_000, "audio samples per batch and process, padding included")
    max_samples: int = option(250_000, "crop longer files to this many samples (250000: 15.6 s)")
    min_samples: int = option(32_000, "skip files shorter than this many samples (32000: 2 s)")
    num_workers: int = option(4, "data loader processes decoding audio")
    inputs: list[str] = field(default_factory=list)  # the DATA the run was started with (a record, for plots)

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_samples < 1 or self.min_samples < 0 or self.num_workers < 0:
            raise ValueError("max_tokens and max_samples must be >= 1, min_samples and num_workers >= 0; got "
                             f"{self.max_tokens}, {self.max_samples}, {self.min_samples}, {self.num_workers}")


@dataclass
class RunConfig:
    """Everything that defines a pretraining run; saved in its directory as ``CONFIG_FILE``."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: PretrainingLossConfig = field(default_factory=PretrainingLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "base"

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": self.train.to_dict(),
                "loss": dataclasses.asdict(self.loss), "data": dataclasses.asdict(self.data)}


def _preset_overrides(name: str) -> dict:
    """Per-preset departures from the BASE defaults of each dataclass."""
    if name == "base":  # fairseq wav2vec2_base_librispeech: 64 GPUs x 1.4M samples, 400k updates
        return {"train": dict(lr=5e-4, warmup_updates=32_000, max_updates=400_000, precision="bf16")}
    if name == "large":  # paper: peak lr 3e-4, Gumbel to 0.1, 128 GPUs x 1.2M samples
        return {"train": dict(lr=3e-4, warmup_updates=32_000, max_updates=250_000, precision="bf16"),
                "loss": dict(gumbel_end=0.1, feature_grad_scale=1.0), "data": dict(max_tokens=1_200_000)}
    if name == "small":  # 4.5M parameters, sized for minutes on a CPU
        # Pretraining-only departures (the fine-tuned architecture is config.small's): a 2 x 16 codebook,
        # no dropout, no feature penalty -- each of those kept this model at chance level
        # (contrastive = ln(K + 1)) for hundreds of updates -- and a 3x diversity weight (at 0.1 the
        # small codebook collapsed, perplexity 27 -> 4 of 32). For a 30-minute CPU run that learns
        # (one thread, longer crops, larger batches): recipes/configs/pretrain_small_cpu.json and
        # docs/pretraining.md.
        return {"model": dict(num_codevectors_per_group=16, hidden_dropout=0.0, attention_dropout=0.0,
                              feat_proj_dropout=0.0),
                "train": dict(lr=2e-3, warmup_updates=50, max_updates=1200, clip_norm=10.0, save_interval=100,
                              log_interval=10),
                "loss": dict(penalty_weight=0.0, diversity_weight=0.3, gumbel_decay=0.998),
                "data": dict(max_tokens=96_000, max_samples=32_000, min_samples=16_000, num_workers=1)}
    if name == "tiny":  # tests and smoke runs
        return {"train": dict(lr=1e-3, warmup_updates=10, max_updates=100, save_interval=50, log_interval=10),
                "loss": dict(num_negatives=10, mask_length=4, gumbel_decay=0.99, penalty_weight=0.0),
                "data": dict(max_tokens=64_000, max_samples=16_000, min_samples=4000, num_workers=0)}
    raise ValueError(f"unknown preset {name!r}; choose one of tiny, small, base, large")


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "loss": PretrainingLossConfig, "data": DataConfig}


def preset_config(name: str = "base", overrides: dict | None = None) -> RunConfig:
    """The preset ``name`` with ``overrides`` (a dict with optional ``model``, ``train``, ``loss``,
    ``data`` sections) applied on top. Raises :class:`w2v2.config.ConfigError` listing every
    problem (unknown sections and options, wrong types, values out of range)."""
    problems = []
    try:
        parts = _preset_overrides(name)
    except ValueError as e:
        problems.append(str(e))
        parts, name = {}, "base"
    for section, values in (overrides or {}).items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            problems.append(f"unknown section {section!r} in the pretraining config; use model, train, loss, data")
            continue
        problems += check_fields(SECTIONS[section], values, section)
        # the valid options still go in, so that range checks below see them too
        parts[section] = {**parts.get(section, {}), **valid_fields(SECTIONS[section], values)}
    built = {}
    for section, cls in SECTIONS.items():
        try:
            if section == "model":
                built[section] = model_presets.preset(name).replace(**parts.get("model", {}))
            else:
                built[section] = cls(**parts.get(section, {}))
        except (ValueError, TypeError) as e:
            problems.append(f"{section}: {e}")
    if problems:
        raise ConfigError(problems)
    return RunConfig(model=built["model"], train=built["train"], loss=built["loss"], data=built["data"], preset=name)


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object in ``path``; :class:`w2v2.config.ConfigError` naming the file when it is not one."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read ({getattr(e, 'strerror', None) or e})"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}"]) from None
    if not isinstance(d, dict):
        raise ConfigError([f"{path}: expected a JSON object with sections model/train/loss/data"])
    return d


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """A JSON file ``{"preset": "small", "model": {...}, "train": {...}, "loss": {...}, "data": {...}}``
    (every section optional; a file written by :meth:`RunConfig.to_dict` loads back unchanged)."""
    d = read_config_file(path)
    return preset_config(d.get("preset", "base"), d)


# ---------------------------------------------------------------------------- a whole run


CONFIG_FILE = "pretrain_config.json"


def prepare_data(inputs, cfg: RunConfig) -> tuple:
    """List and check the audio of ``inputs`` (manifests, folders, files): ``(good, bad)``
    (:func:`w2v2.manifest.check_entries`: up front, or when first read for large manifests)."""
    from .data import check_entries, list_entries

    return check_entries(list_entries(inputs), min_seconds=cfg.data.min_samples / cfg.model.sampling_rate)


def shard_loader_factory(catalog: ShardCatalog, cfg: RunConfig, info):
    """The cropping loader over tar shards (:mod:`w2v2.formats.stream`), utterances shorter than
    ``min_samples`` left out (their durations are in the catalog: nothing is probed)."""
    from .data import Collate
    from .formats.stream import StreamOptions, shard_loader

    rate = cfg.model.sampling_rate
    opts = StreamOptions(cfg.data.max_tokens, max_samples=cfg.data.max_samples, crop_to_shortest=True,
                         seed=cfg.train.seed, sample_rate=rate)
    keep = [np.round(seconds * rate) >= cfg.data.min_samples for seconds in catalog.seconds]
    if not any(k.any() for k in keep):
        raise ValueError(f"no utterance of the shards lasts min_samples ({cfg.data.min_samples}) or more")
    return shard_loader(catalog, opts, Collate(crop_to_shortest=True, seed=cfg.train.seed), rank=info.rank,
                        world_size=info.world_size, num_workers=cfg.data.num_workers, keep=keep)[1]


def build_trainer(entries, run_dir: str | os.PathLike, cfg: RunConfig, model: Wav2Vec2 | None = None, hooks=()):
    """Model (fresh from ``cfg.model`` unless given), bucketed cropping loader and trainer for a run.
    ``entries``: validated entries, or a :class:`w2v2.formats.shards.ShardCatalog`."""
    from .data import AudioDataset, BucketBatchSampler, Collate, make_loader_factory
    from .model import build_model
    from .distributed import dist_info
    from .trainer import Trainer

    if not len(entries):
        raise ValueError("no usable audio to pretrain on (every file was missing, unreadable or too short)")
    info = dist_info()
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model = build_model(cfg.model, with_quantizer=True)
    elif model.quantizer is None:
        raise ValueError("the model to continue pretraining has no quantizer")
    seed = cfg.train.seed
    if isinstance(entries, ShardCatalog):
        loader = shard_loader_factory(entries, cfg, info)
    else:
        ds = AudioDataset(entries, max_samples=cfg.data.max_samples, seed=seed, sample_rate=cfg.model.sampling_rate,
                          min_seconds=cfg.data.min_samples / cfg.model.sampling_rate)
        sampler = BucketBatchSampler(ds.sizes(), cfg.data.max_tokens, seed=seed,
                                     rank=info.rank, world_size=info.world_size, crop_to_shortest=True)
        loader = make_loader_factory(ds, sampler, Collate(crop_to_shortest=True, seed=seed), cfg.data.num_workers)
    train_cfg = cfg.train
    if info.world_size > 1 and cfg.model.layerdrop > 0:
        train_cfg = train_cfg.replace(find_unused_parameters=True)
    trainer = Trainer(model, PretrainingLoss(cfg.loss), loader, train_cfg, run_dir, hooks=hooks,
                      batch_samples=cfg.data.max_tokens)
    if trainer.info.is_main:
        from .fileio import atomic_write_text
        atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2) + "\n")
    return trainer

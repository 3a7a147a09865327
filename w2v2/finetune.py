"""CTC fine-tuning of a wav2vec 2.0 model on transcribed speech, on the shared training engine.

    --init (pretrained run, HF dir / hub id, fairseq .pt, or random:PRESET)
      + character vocabulary of the normalised training transcripts (text.build_vocabulary)
      -> fresh CTC head; feature encoder frozen for good; Transformer frozen for the first
         ``freeze_updates`` updates (only the head trains)
      -> trainer.Trainer with CTCFinetuneLoss (time + channel masking, summed CTC)
         and a Validator hook (greedy WER/CER every ``valid_interval`` updates, ``best/`` kept)

Text: transcripts go through :func:`w2v2.text.normalize_text` (``case`` "upper" by default;
any script) for the vocabulary, the targets, and scoring, so training and evaluation agree.

Masking (fairseq/Hugging Face semantics, applied to the projected features that enter the
Transformer): time spans of ``mask_length`` frames, ``mask_prob * frames / mask_length``
spans per utterance (at least ``mask_min_masks``; ``mask_prob`` 0.075 masks ~7% of frames)
replaced by the learned mask embedding; channel spans of ``mask_channel_length`` channels,
``mask_channel_prob * hidden / mask_channel_length`` per utterance, zeroed in every frame.

Loss: CTC (blank = the vocabulary's pad token, ``zero_infinity``) summed over the batch;
``sample_size`` is the number of utterances (``loss_norm="sentences"``, fairseq's
``sentence_avg``) or of target characters (``"tokens"``); the trainer divides by it.

A run directory holds what the trainer writes (checkpoints, ``metrics.jsonl``/``.csv``,
``train_config.json``) plus ``finetune_config.json``, ``vocab.json``, ``valid.jsonl``/``.csv``
(one row per validation) and ``best/`` (Hugging Face layout, lowest validation WER).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLE_RATE, load_audio
from .checkpoint import load_model, random_init_config, save_pretrained
from .config import option, redefault
from .data import Collate, Entry, EntryTable
from .decoding import greedy_decode
from .decoding.alignment import min_frames
from .emissions import utterance_logits
from .evaluate import error_rates
from .fileio import atomic_open
from .formats import is_shard_input
from .formats.shards import ShardCatalog, load_catalog
from .formats.stream import StreamOptions, shard_loader
from .losses import ctc_loss
from .masking import compute_channel_mask, compute_mask_indices
from .model import Wav2Vec2, build_model
from .runs import temporary_dir
from .text import normalize_text
from .distributed import dist_info
from .trainer import TrainConfig, Trainer
from .vocab import Vocabulary

log = logging.getLogger(__name__)

BEST = "best"
REGULARISATION = ("layerdrop", "hidden_dropout", "attention_dropout", "activation_dropout",
                  "feat_proj_dropout", "final_dropout")


@dataclass(frozen=True)
class FinetuneConfig:
    """What fine-tuning adds to the training engine: text, freezing, masking, loss, batches,
    regularisation and validation (the optimisation is :class:`FinetuneTrainConfig`)."""

    case: str | None = option("upper", "letter case of the normalised transcripts (vocabulary, targets, scoring); "
                                       "None (keep on the command line) leaves it as written",
                              choices=("upper", "lower", "keep"), none="keep")
    freeze_updates: int = option(0, "updates during which only the CTC head trains (fairseq freeze_finetune_updates)")
    feature_grad_scale: float = option(0.0, "0 freezes the convolutional feature encoder (the fairseq recipe); "
                                            "1 trains it (from scratch)")
    mask_prob: float = option(0.075, "time masking: mask_prob * frames / mask_length spans per utterance "
                                     "(about the fraction of frames masked)")
    mask_length: int = option(10, "time masking: frames per span")
    mask_min_masks: int = option(2, "time masking: at least this many spans per utterance")
    mask_channel_prob: float = option(0.1, "channel masking of the projected features: "
                                           "mask_channel_prob * hidden size / mask_channel_length spans per utterance")
    mask_channel_length: int = option(64, "channel masking: channels per span")
    loss_norm: str = option("sentences", "divide the summed CTC loss by utterances (fairseq sentence_avg) or by "
                                         "characters", choices=("sentences", "tokens"))
    max_tokens: int = option(3_200_000, "audio samples per batch and process, padding included")
    max_batch_size: int | None = option(None, "at most this many utterances per batch; None: no limit")
    num_workers: int = option(0, "data loader processes decoding audio")
    layerdrop: float | None = option(0.05, "probability of skipping a Transformer layer in training; None: the "
                                           "initial model's value")
    hidden_dropout: float | None = option(None, "dropout of the Transformer's hidden states; None: the initial "
                                                "model's value")
    attention_dropout: float | None = option(None, "dropout of the attention weights; None: the initial model's value")
    activation_dropout: float | None = option(None, "dropout inside the feed-forward blocks; None: the initial "
                                                    "model's value")
    feat_proj_dropout: float | None = option(None, "dropout after the feature projection; None: the initial "
                                                   "model's value")
    final_dropout: float | None = option(None, "dropout before the CTC head; None: the initial model's value")
    valid_interval: int = option(500, "updates between validations (and one at the end)")
    valid_batch_seconds: float = option(200.0, "padded audio per validation forward pass, in seconds")
    best_metric: str = option("wer", "what best/ minimises on the validation set (cer for models still near "
                                     "100% WER)", choices=("wer", "cer"))

    def __post_init__(self) -> None:
        if self.best_metric not in ("wer", "cer"):
            raise ValueError(f"best_metric must be 'wer' or 'cer', got {self.best_metric!r}")
        if self.loss_norm not in ("sentences", "tokens"):
            raise ValueError(f"loss_norm must be 'sentences' or 'tokens', got {self.loss_norm!r}")
        if self.valid_interval < 1:
            raise ValueError(f"valid_interval must be >= 1, got {self.valid_interval}")
        if self.max_tokens < 1 or self.num_workers < 0 or (self.max_batch_size is not None and self.max_batch_size < 1):
            raise ValueError(f"max_tokens and max_batch_size must be >= 1, num_workers >= 0; got {self.max_tokens}, "
                             f"{self.max_batch_size}, {self.num_workers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def regularisation(self) -> dict:
        """The ``REGULARISATION`` overrides of the model's configuration (None: keep the model's)."""
        return {k: getattr(self, k) for k in REGULARISATION}


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """:class:`~w2v2.trainer.TrainConfig` with fine-tuning's defaults, the optimisation of fairseq's
    base_1h recipe (a tri-stage schedule peaking at 5e-5 over 13k updates, Adam epsilon 1e-8, no
    weight decay); ``finetune()`` uses it when given no training options, and ``w2v2 finetune``
    takes its flags' defaults from it."""

    lr: float = redefault(TrainConfig, "lr", 5e-5)
    schedule: str = redefault(TrainConfig, "schedule", "tri_stage")
    warmup_updates: int = redefault(TrainConfig, "warmup_updates", 1000)
    max_updates: int = redefault(TrainConfig, "max_updates", 13_000)
    eps: float = redefault(TrainConfig, "eps", 1e-8)
    weight_decay: float = redefault(TrainConfig, "weight_decay", 0.0)
    keep_last: int = redefault(TrainConfig, "keep_last", 2)


# ---------------------------------------------------------------------------- model
def init_model(spec: str, vocab: Vocabulary, **regularisation) -> Wav2Vec2:
    """The model to fine-tune, with a CTC head for ``vocab``.

    ``spec``: ``random:PRESET`` (tiny, small, base, large) or ``random:CONFIG.json`` (a
    ``config.json`` with Hugging Face field names), randomly initialised, for from-scratch
    training; or anything :func:`w2v2.load_model` takes (our run and checkpoint dirs, Hugging
    Face dirs and hub ids, fairseq ``.pt``). A head is kept only when the source
    model already has one for exactly this vocabulary. ``regularisation``: ModelConfig
    overrides among ``REGULARISATION`` (None values are ignored)."""
    overrides = {k: v for k, v in regularisation.items() if v is not None}
    unknown = set(overrides) - set(REGULARISATION)
    if unknown:
        raise ValueError(f"unknown regularisation options {sorted(unknown)}; known: {REGULARISATION}")
    architecture = random_init_config(spec)
    if architecture is not None:
        return build_model(architecture.replace(**overrides), vocab=vocab)
    source = load_model(spec, with_quantizer=False)
    keep_head = source.lm_head is not None and source.vocab is not None and source.vocab.tokens == vocab.tokens
    model = build_model(source.config.replace(**overrides), vocab=source.vocab if keep_head else None, init=False)
    model.load_state_dict(source.state_dict(), strict=True)
    if not keep_head:
        model.with_ctc_head(vocab)
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
        torch.nn.init.zeros_(model.lm_head.bias)
    log.info("initialised from %s (%s CTC head, %d outputs)", spec, "its" if keep_head else "a new", len(vocab))
    return model


def freeze_feature_encoder(model: Wav2Vec2, grad_scale: float = 0.0) -> None:
    """``grad_scale`` 0: no gradient ever reaches the convolutional feature encoder (fairseq
    ``feature_grad_mult=0``, the fine-tuning recipe); its parameters leave the optimizer.
    Otherwise its gradient is scaled by ``grad_scale`` (training from scratch wants 1)."""
    model.feature_grad_scale = grad_scale
    for p in model.feature_extractor.parameters():
        p.requires_grad_(grad_scale > 0)


def transformer_parameters(model: Wav2Vec2) -> list[torch.nn.Parameter]:
    """Everything between the feature encoder and the CTC head: feature projection, mask
    embedding, positional convolution, Transformer layers."""
    skip = {id(p) for m in (model.feature_extractor, model.lm_head) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def set_transformer_trainable(model: Wav2Vec2, trainable: bool) -> None:
    for p in transformer_parameters(model):
        p.requires_grad_(trainable)


# ---------------------------------------------------------------------------- data
def encode_text(text: str | None, vocab: Vocabulary, case: str | None) -> list[int]:
    return vocab.encode(normalize_text(text or "", case=case))


_ADJACENT_REPEATS = re.compile(r"(.)(?=\1)", re.S)


def frames_needed(text: str, vocab: Vocabulary) -> int:
    """``min_frames(vocab.encode(text))`` for normalised ``text``, without a list per transcript:
    when every character has its own token (and none is the word delimiter, which spaces become),
    tokens and characters correspond one to one, so their count and adjacent repeats are the
    text's. Fine-tuning asks this of every transcript at start-up (a million of them at corpus scale)."""
    if vocab.word_delimiter not in text and vocab.plain_characters.issuperset(text):
        return len(text) + len(_ADJACENT_REPEATS.findall(text))
    return min_frames(vocab.encode(text))


def usable_entries(entries: Sequence[Entry], vocab: Vocabulary, case: str | None,
                   num_frames) -> tuple[EntryTable, list[tuple[Entry, str]]]:
    """Drop utterances CTC cannot learn from: no text after normalisation, or audio too short
    for its transcript (fewer frames than characters plus repeats). ``num_frames(samples)``."""
    table = EntryTable.from_entries(entries)
    samples = np.rint(np.nan_to_num(table.seconds) * SAMPLE_RATE).astype(np.int64)
    frames = num_frames(torch.from_numpy(samples)).numpy()  # (entries,)
    keep = np.ones(len(table), bool)
    bad = []
    for i, text in enumerate(table.texts()):
        normalised = normalize_text(text or "", case=case)
        if not normalised:
            reason = "no transcript after normalisation"
        elif frames[i] < frames_needed(normalised, vocab):
            reason = f"{frames[i]} frames cannot hold {len(vocab.encode(normalised))} characters"
        else:
            continue
        keep[i] = False
        bad.append((table[i], reason))
    return table.select(keep), bad


class CTCCollate(Collate):
    """:class:`w2v2.data.Collate` (zero-padded) plus ``targets`` (batch, S) padded with -1 and
    ``target_lengths`` (batch,) from the normalised transcripts."""

    def __init__(self, vocab: Vocabulary, case: str | None = "upper"):
        super().__init__(crop_to_shortest=False)
        self.vocab, self.case = vocab, case

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        labels = [encode_text(t, self.vocab, self.case) for t in batch["texts"]]
        targets = torch.full((len(labels), max((len(x) for x in labels), default=0)), -1, dtype=torch.long)
        for i, x in enumerate(labels):
            targets[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        batch["targets"] = targets
        batch["target_lengths"] = torch.tensor([len(x) for x in labels], dtype=torch.long)
        return batch


# ---------------------------------------------------------------------------- loss
class CTCFinetuneLoss:
    """``loss_fn(model, batch) -> (loss_sum, sample_size, metrics)`` for :class:`trainer.Trainer`.

    ``set_step(step)`` (called by the trainer before every update) freezes the Transformer
    while ``step < freeze_updates``: its parameters stop requiring gradients, so the backward
    pass stops at the head and the optimizer leaves them (and their moments) untouched."""

    def __init__(self, model: Wav2Vec2, vocab: Vocabulary, cfg: FinetuneConfig):
        self.model, self.vocab, self.cfg = model, vocab, cfg
        self.frozen: bool | None = None

    def set_step(self, step: int) -> None:
        frozen = step < self.cfg.freeze_updates
        if frozen != self.frozen:
            set_transformer_trainable(self.model, not frozen)
            if self.frozen is not None:
                log.info("update %d: Transformer %s", step + 1, "frozen" if frozen else "unfrozen, now trained")
            self.frozen = frozen

    def masks(self, model: Wav2Vec2, batch_size: int, frames: int, lengths: torch.Tensor):
        """(time mask (batch, frames) or None, channel mask (batch, hidden) or None), on the CPU."""
        cfg = self.cfg
        time = channel = None
        if cfg.mask_prob > 0:
            time = compute_mask_indices((batch_size, frames), cfg.mask_prob, cfg.mask_length,
                                        lengths=lengths.cpu(), min_masks=cfg.mask_min_masks)
        if cfg.mask_channel_prob > 0:
            channel = compute_channel_mask((batch_size, model.config.hidden_size), cfg.mask_channel_prob,
                                           cfg.mask_channel_length)
        return time, channel

    def __call__(self, model: Wav2Vec2, batch: dict):
        wav, lengths = batch["waveforms"], batch["lengths"]  # (batch, samples), (batch,)
        targets, target_lengths = batch["targets"], batch["target_lengths"]  # (batch, S), (batch,)
        time_mask = channel_mask = None
        if model.training:
            frames = int(model.num_frames(torch.tensor([wav.shape[1]]))[0])
            time_mask, channel_mask = self.masks(model, wav.shape[0], frames, model.num_frames(lengths))
            time_mask = None if time_mask is None else time_mask.to(wav.device)
            channel_mask = None if channel_mask is None else channel_mask.to(wav.device)
        out = model(wav, lengths, mask_time_indices=time_mask, mask_channel_indices=channel_mask)
        log_probs = out.logits.float().log_softmax(-1)  # (batch, frames, vocab)
        loss = ctc_loss(log_probs, out.lengths, targets, target_lengths, blank=self.vocab.blank_index,
                        zero_infinity=True, reduction="sum")
        ntokens = int(target_lengths.sum())
        sample_size = wav.shape[0] if self.cfg.loss_norm == "sentences" else ntokens
        metrics = {"loss_per_token": float(loss.detach()) / max(ntokens, 1),
                   "frozen": float(bool(self.frozen))}
        if time_mask is not None:
            metrics["mask_frac"] = float(time_mask.sum()) / float(out.lengths.sum())
        return loss, sample_size, metrics


# ---------------------------------------------------------------------------- validation
@dataclass
class Validation:
    loss_per_token: float
    wer: float
    cer: float
    refs: list[str]
    hyps: list[str]


def validate(model: Wav2Vec2, waves: list[np.ndarray], texts: list[str], vocab: Vocabulary,
             case: str | None, batch_seconds: float = 200.0, device=None) -> Validation:
    """Greedy WER/CER (same normalisation as training) and CTC loss per target character."""
    if device is not None:
        model.to(device)
    logits = utterance_logits(model, waves, int(batch_seconds * SAMPLE_RATE))  # eval mode, no masking
    refs = [normalize_text(t, case=case) for t in texts]
    hyps = [normalize_text(greedy_decode(lg, vocab).text, case=case) for lg in logits]
    total, ntokens = 0.0, 0
    for lg, ref in zip(logits, refs):
        target = vocab.encode(ref)
        if not target:
            continue
        lp = lg.log_softmax(-1)[None]  # (1, frames, vocab)
        total += float(ctc_loss(lp, torch.tensor([lp.shape[1]]), torch.tensor([target]),
                                torch.tensor([len(target)]), blank=vocab.blank_index, reduction="sum"))
        ntokens += len(target)
    wer, cer = error_rates(refs, hyps)
    return Validation(total / max(ntokens, 1), wer, cer, refs, hyps)


class Validator:
    """Trainer hook: every ``cfg.valid_interval`` updates (and after the last), validate on rank 0,
    append a row to ``valid.jsonl``/``valid.csv`` and keep the lowest-WER model in ``best/``
    (ties broken by CER, then validation loss).

    The best WER so far lives in ``trainer.extra_state`` and so survives a resume; rows written
    after the resumed checkpoint by an interrupted run are dropped at start."""

    def __init__(self, entries: list[Entry], vocab: Vocabulary, cfg: FinetuneConfig, run_dir: str | os.PathLike,
                 max_updates: int):
        self.vocab, self.cfg, self.run_dir, self.max_updates = vocab, cfg, Path(run_dir), max_updates
        self.texts = [e.text or "" for e in entries]
        self.paths = [e.path for e in entries]
        self._waves: list[np.ndarray] | None = None  # decoded once, on first use
        self._started = False

    @property
    def waves(self) -> list[np.ndarray]:
        if self._waves is None:
            self._waves = [load_audio(p) for p in self.paths]
        return self._waves

    def _start(self, last_valid: int) -> None:
        """Keep the rows up to the resumed checkpoint's last validation (none in a fresh run)."""
        self._started = True
        rows = [r for r in read_valid_log(self.run_dir) if r["update"] <= last_valid]
        with atomic_open(self.run_dir / "valid.jsonl") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        _write_valid_csv(self.run_dir, rows)

    def __call__(self, trainer, row: dict) -> None:
        if not self._started and trainer.info.is_main:  # drop rows a resumed run will redo, at once
            self._start(trainer.extra_state.get("last_valid", 0))
        step = trainer.step
        due = (step % self.cfg.valid_interval == 0 or step >= self.max_updates) and not row["skipped"]
        if due:
            self.validate(trainer, row)

    def at_end(self, trainer) -> None:
        """Training stopped (time limit, signal, last update): validate the final weights unless
        that was just done, so that ``best/`` never misses the end of a run."""
        if trainer.step > 0:
            self.validate(trainer, {"epoch": trainer.epoch})

    def validate(self, trainer, row: dict) -> None:
        step = trainer.step
        if not trainer.info.is_main or trainer.extra_state.get("last_valid") == step:
            return
        if not self._started:
            self._start(trainer.extra_state.get("last_valid", 0))
        model = trainer.model
        v = validate(model, self.waves, self.texts, self.vocab, self.cfg.case, self.cfg.valid_batch_seconds)
        best = trainer.extra_state.get("best_wer", math.inf)
        key = [v.wer, v.cer, v.loss_per_token]  # ties in WER (all 100% early on) go to lower CER, then loss
        if self.cfg.best_metric == "cer":
            key = [v.cer, v.wer, v.loss_per_token]
        improved = key < trainer.extra_state.get("best_key", [math.inf] * 3)
        if improved:
            save_best(model, self.run_dir / BEST, step, v)
            trainer.extra_state.update(best_wer=v.wer, best_key=key, best_update=step)
        trainer.extra_state["last_valid"] = step
        out = {"update": step, "epoch": row.get("epoch"), "valid_loss": v.loss_per_token, "valid_wer": v.wer,
               "valid_cer": v.cer, "best_wer": min(best, v.wer), "train_loss": row.get("loss")}
        with open(self.run_dir / "valid.jsonl", "a") as f:
            f.write(json.dumps(out) + "\n")
        _write_valid_csv(self.run_dir, read_valid_log(self.run_dir))
        example = next((f"ref: {r} | hyp: {h}" for r, h in zip(v.refs, v.hyps)), "")
        log.info("valid @%d: WER %.2f%% CER %.2f%% loss/char %.3f%s | %s", step, 100 * v.wer, 100 * v.cer,
                 v.loss_per_token, " (best)" if improved else "", example)


def save_best(model: Wav2Vec2, directory: Path, step: int, v: Validation) -> None:
    """Replace ``directory`` with the model in Hugging Face layout (written aside, then renamed)."""
    tmp = temporary_dir(directory)
    try:
        save_pretrained(model, tmp)
        (tmp / "best.json").write_text(json.dumps({"update": step, "valid_wer": v.wer, "valid_cer": v.cer,
                                                   "valid_loss": v.loss_per_token}, indent=2) + "\n")
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_valid_log(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "valid.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a torn last line
    return rows


def _write_valid_csv(run_dir: Path, rows: list[dict]) -> None:
    cols = ["update", "epoch", "valid_loss", "valid_wer", "valid_cer", "best_wer", "train_loss"]
    with atomic_open(run_dir / "valid.csv") as f:
        f.write(",".join(cols) + "\n")
        for r in rows:
            f.write(",".join("" if r.get(c) is None else str(r[c]) for c in cols) + "\n")


# ---------------------------------------------------------------------------- a run
def read_data(train: list[str], valid: list[str]) -> tuple[EntryTable, EntryTable]:
    """The entries of the ``train`` and ``valid`` manifests, which must have a ``text`` column
    (``train`` may be tar shards: their utterances, paths ``URL#KEY``). Raises
    :class:`w2v2.data.ManifestError` listing every problem of both at once."""
    return _read_data(train, valid)[:2]


def _read_data(train: list[str], valid: list[str]) -> tuple[EntryTable, EntryTable, ShardCatalog | None]:
    """:func:`read_data`, and the shards' catalog when ``train`` is tar shards (else None), read once."""
    from .data import ManifestError, list_entries

    out, problems, catalog = [], [], None
    for inputs in (train, valid):
        try:
            if inputs is train and all(map(is_shard_input, inputs)):
                catalog = load_catalog(inputs)
                out.append(EntryTable.from_entries(e for _, _, e in catalog.entries()))
            else:
                out.append(list_entries(inputs, require_text=True))
        except ManifestError as e:
            out.append([])
            problems += e.problems
    if problems:
        raise ManifestError(problems)
    return out[0], out[1], catalog


def _checked_entries(entries: EntryTable, inputs: list[str], what: str) -> EntryTable:
    """Entries whose audio is usable (checked up front or when first read, :func:`w2v2.data.check_entries`;
    the unusable ones found up front listed); an error if none is."""
    from .data import check_entries

    good, bad = check_entries(entries)
    for e, reason in bad[:20]:
        log.warning("%s: skipping %s: %s", what, e.path, reason)
    if len(bad) > 20:
        log.warning("%s: ... and %d more unusable files", what, len(bad) - 20)
    if not good:
        raise ValueError(f"{what} {' '.join(map(str, inputs))}: no usable audio")
    return good


def run_vocabulary(run_dir: Path, texts: Iterable[str], case: str | None, resume: bool) -> Vocabulary:
    """The run's vocabulary: built from the training texts, or the one a resumed run saved."""
    from .text import build_vocabulary

    vocab = build_vocabulary(texts, case=case)
    saved = run_dir / "vocab.json"
    if resume and saved.exists():
        old = Vocabulary.load(saved)
        if old.tokens != vocab.tokens:
            raise ValueError(f"{saved}: the run was started with another vocabulary "
                             f"({''.join(old.tokens[5:])!r} vs {''.join(vocab.tokens[5:])!r}); "
                             "resume with the same --train data and --case")
    return vocab


def finetune(init: str, train: list[str], valid: list[str], run_dir: str | os.PathLike,
             cfg: FinetuneConfig | None = None, train_cfg: TrainConfig | None = None, *, resume: bool = False) -> dict:
    """Fine-tune ``init`` on the ``train`` manifests/folders; returns the trainer's summary plus
    ``best_wer``, ``best_update`` and ``best`` (the best model's directory). Options left out are
    ``w2v2 finetune``'s defaults: ``FinetuneConfig()`` and ``FinetuneTrainConfig()``."""
    from .data import AudioDataset, BucketBatchSampler, make_loader_factory

    cfg = FinetuneConfig() if cfg is None else cfg
    train_cfg = FinetuneTrainConfig() if train_cfg is None else train_cfg
    if train_cfg.fsdp:  # validation runs the whole model on rank 0 alone, which a sharded one cannot
        raise ValueError("fsdp is for pretraining; fine-tuning validates on rank 0 alone and needs whole weights "
                         "there (DDP)")
    run_dir = Path(run_dir)  # created by the trainer, once everything below has been checked
    train_entries, valid_entries, catalog = _read_data(train, valid)
    if catalog is None:  # shards were checked by w2v2 prepare; one that fails to decode is logged and left out
        train_entries = _checked_entries(train_entries, train, "train")
    vocab = run_vocabulary(run_dir, (t or "" for t in train_entries.texts()), cfg.case, resume)
    model = init_model(init, vocab, **cfg.regularisation())
    freeze_feature_encoder(model, cfg.feature_grad_scale)
    train_entries, dropped = usable_entries(train_entries, vocab, cfg.case, model.num_frames)
    for e, reason in dropped:
        log.warning("train: skipping %s: %s", e.path, reason)
    if not train_entries:
        raise ValueError(f"train {' '.join(map(str, train))}: no utterance has a usable transcript "
                         "(a 'text' column with words, and audio long enough for it)")
    valid_entries = _checked_entries(valid_entries, valid, "valid")
    no_text = [e for e in valid_entries if not normalize_text(e.text or "", case=cfg.case)]
    for e in no_text:
        log.warning("valid: skipping %s: no transcript after normalisation", e.path)
    valid_entries = [e for e in valid_entries if e not in no_text]
    if not valid_entries:
        raise ValueError(f"valid {' '.join(map(str, valid))}: no utterance has a transcript to score against")
    log.info("train: %d utterances, %.2f h; valid: %d utterances; vocabulary (%d): %s", len(train_entries),
             train_entries.total_seconds() / 3600, len(valid_entries), len(vocab),
             "".join(t for t in vocab.tokens if len(t) == 1))

    info = dist_info()
    collate = CTCCollate(vocab, cfg.case)
    if catalog is not None:
        usable = {e.path for e in train_entries}
        keep = [np.array([f"{url}#{key}" in usable for key in keys]) for url, keys in zip(catalog.urls, catalog.keys)]
        opts = StreamOptions(cfg.max_tokens, max_batch_size=cfg.max_batch_size, seed=train_cfg.seed)
        loader = shard_loader(catalog, opts, collate, rank=info.rank, world_size=info.world_size,
                              num_workers=cfg.num_workers, keep=keep)[1]
    else:
        dataset = AudioDataset(train_entries, max_samples=None, seed=train_cfg.seed)
        sampler = BucketBatchSampler(dataset.sizes(), cfg.max_tokens,
                                     seed=train_cfg.seed, rank=info.rank, world_size=info.world_size,
                                     max_batch_size=cfg.max_batch_size)
        loader = make_loader_factory(dataset, sampler, collate, cfg.num_workers)
    if cfg.freeze_updates > 0 or model.config.layerdrop > 0:
        train_cfg = train_cfg.replace(find_unused_parameters=True)  # DDP: some parameters get no gradient
    validator = Validator(valid_entries, vocab, cfg, run_dir, train_cfg.max_updates)
    trainer = Trainer(model, CTCFinetuneLoss(model, vocab, cfg), loader, train_cfg, run_dir, hooks=[validator],
                      batch_samples=cfg.max_tokens)
    if info.is_main:
        vocab.save(run_dir / "vocab.json")
        with atomic_open(run_dir / "finetune_config.json") as f:
            options = {k: v for k, v in cfg.to_dict().items() if k not in REGULARISATION}
            json.dump({"init": init, "train": list(map(str, train)), "valid": list(map(str, valid)),
                       "regularisation": {k: getattr(model.config, k) for k in REGULARISATION}, **options},
                      f, indent=2)
    summary = trainer.train(resume=resume)
    best = run_dir / BEST
    summary.update(best_wer=trainer.extra_state.get("best_wer"), best_update=trainer.extra_state.get("best_update"),
                   best=best if best.exists() else None)
    return summary

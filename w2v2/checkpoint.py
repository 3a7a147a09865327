"""Loading and saving models: Hugging Face layout (also our own format), Hub ids, fairseq files.

Our checkpoints *are* Hugging Face directories (config.json, model.safetensors, vocab.json,
preprocessor_config.json), so anything we write loads in transformers and vice versa.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import convert
from .config import ModelConfig
from .fileio import atomic_write_bytes, atomic_write_text, verify_checksums
from .model import Wav2Vec2, build_model
from .vocab import Vocabulary

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "vocab.json",
             "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"]
# Inside a training run directory, the model that stands for the run, in order of preference.
RUN_DIR_MODELS = ("best", "checkpoint_last")
# The letter dictionary of every LibriSpeech fine-tuned fairseq model (dict.ltr.txt), blank first.
LIBRISPEECH_LETTERS = ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D",
                       "L", "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")


DEFAULT_MODEL_CARD = "w2v2_default.json"  # in DEFAULT_MODEL_DIR: what the model is and how well it does


def default_model_notice() -> str | None:
    """One line for users of the embedded default model: what it is and how accurate it is (from
    its model card), or None when no default model is embedded."""
    try:
        card = json.loads((DEFAULT_MODEL_DIR / DEFAULT_MODEL_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card.get("notice")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# --------------------------------------------------------------------------- public API
def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               with_quantizer: bool | None = None) -> Wav2Vec2:
    """Load a model from a local Hugging Face-layout directory (ours too), a Hub id, or a fairseq ``.pt``.

    A training run directory loads its ``best/`` model, else its newest checkpoint.

    ``source=None`` or ``"default"`` loads the default model embedded in the package. The model is
    returned in eval mode. ``with_quantizer=False`` drops pretraining modules when present.
    """
    path = _resolve(source)
    if path.is_dir():
        model = _load_hf_dir(path)
    elif path.suffix in (".pt", ".pth", ".ckpt"):
        model = _load_fairseq(path)
    else:
        raise CheckpointError(f"{path}: not a model directory or a fairseq .pt checkpoint")
    if with_quantizer is False:
        model.without_quantizer()
    return model.to(device).eval()


def save_pretrained(model: Wav2Vec2, directory: str | os.PathLike) -> Path:
    """Write Hugging Face layout: ``Wav2Vec2ForCTC`` when the model has a CTC head, else
    ``Wav2Vec2ForPreTraining`` (with quantizer) or ``Wav2Vec2Model``. Every file is written atomically."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if model.lm_head is not None:
        arch = "Wav2Vec2ForCTC"
    elif model.quantizer is not None:
        arch = "Wav2Vec2ForPreTraining"
    else:
        arch = "Wav2Vec2Model"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if arch == "Wav2Vec2ForCTC":  # the quantizer is dropped from fine-tuned models
        state = {k: v for k, v in state.items() if not k.startswith(("quantizer.", "project_hid.", "project_q."))}
    # Wav2Vec2Model's own keys carry no prefix; the heads' models nest it under "wav2vec2."
    hf_state = state if arch == "Wav2Vec2Model" else convert.ours_to_hf(state)
    pad = model.vocab.blank_index if model.vocab is not None else 0
    atomic_write_bytes(out / "model.safetensors", save(hf_state, metadata={"format": "pt"}))
    _write_json(out / "config.json", convert.config_to_hf(cfg, arch, pad_token_id=pad))
    _write_json(out / "preprocessor_config.json", {
        "do_normalize": cfg.do_normalize, "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1, "padding_side": "right", "padding_value": 0.0,
        "return_attention_mask": cfg.feat_extract_norm == "layer", "sampling_rate": cfg.sampling_rate,
    })
    if model.vocab is not None:
        v = model.vocab
        _write_json(out / "vocab.json", v.to_json_dict())
        _write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "Wav2Vec2CTCTokenizer", "unk_token": v.unk, "bos_token": "<s>", "eos_token": "</s>",
            "pad_token": v.blank, "word_delimiter_token": v.word_delimiter, "do_lower_case": False,
        })
        _write_json(out / "special_tokens_map.json", {"unk_token": v.unk, "bos_token": "<s>", "eos_token": "</s>",
                                                       "pad_token": v.blank})
    return out


# --------------------------------------------------------------------------- resolution
def _resolve(source) -> Path:
    if source is None or str(source) == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise CheckpointError(
                "no default model is embedded in this installation; pass one with --model "
                "(a local directory, a fairseq .pt file or a Hugging Face id such as facebook/wav2vec2-base-960h)"
            )
        return DEFAULT_MODEL_DIR
    path = Path(source).expanduser()
    if path.exists():
        return _run_dir_model(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith((".", "/")):
        return _download(str(source))
    raise CheckpointError(f"{source}: no such file or directory (and not a Hugging Face id like org/name)")


def _run_dir_model(path: Path) -> Path:
    """A training run directory (no config.json of its own) stands for its ``best/`` model when it
    has one (fine-tuning keeps the lowest validation WER there), else its newest checkpoint."""
    if not path.is_dir() or (path / "config.json").exists():
        return path
    for name in RUN_DIR_MODELS:
        if (path / name / "config.json").exists():
            return (path / name).resolve()
    from .runs import checkpoint_dirs  # the one place that knows checkpoint names and their order

    numbered = [p for p in checkpoint_dirs(path) if (p / "config.json").exists()]
    return numbered[-1] if numbered else path


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - a core dependency
        raise CheckpointError(f"{repo_id}: huggingface_hub is needed to download models") from e
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # network, auth, offline mode, missing repo: one clear line
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Offline? Download it elsewhere and pass the local directory instead."
        ) from e


# --------------------------------------------------------------------------- Hugging Face layout
def _load_hf_dir(path: Path) -> Wav2Vec2:
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face-layout model directory)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from e
    cfg = convert.config_from_hf(hf_cfg, source=str(cfg_path))
    pre = path / "preprocessor_config.json"
    if pre.exists():
        cfg = cfg.replace(do_normalize=bool(json.loads(pre.read_text()).get("do_normalize", True)))
    raw = _read_weights(path)
    arch = (hf_cfg.get("architectures") or ["?"])[0]
    if arch == "Wav2Vec2Model" or not any(k.startswith("wav2vec2.") for k in raw):
        raw = {"wav2vec2." + k: v for k, v in raw.items()}
    state = convert.hf_to_ours(raw, source=str(path))
    vocab = Vocabulary.load(path / "vocab.json") if (path / "vocab.json").exists() else None
    return _build_from_state(cfg, state, vocab, str(path))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    try:  # a training checkpoint records the SHA-256 of its files
        verify_checksums(path, names=["config.json", st.name, index.name, binf.name])
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    try:
        if st.exists():
            return load_file(str(st))
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out = {}
            for s in shards:
                out.update(load_file(str(path / s)))
            return out
        if binf.exists():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, EOFError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted or truncated weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")


def _build_from_state(cfg: ModelConfig, state: dict, vocab: Vocabulary | None, source: str) -> Wav2Vec2:
    has_head = "lm_head.weight" in state
    has_quantizer = "quantizer.codevectors" in state
    if has_head:
        n = state["lm_head.weight"].shape[0]
        if vocab is not None and len(vocab) != n:
            raise CheckpointError(f"{source}: vocab.json has {len(vocab)} tokens but the CTC head has {n} outputs")
        cfg = cfg.replace(vocab_size=n)
    else:
        cfg = cfg.replace(vocab_size=None)
    model = build_model(cfg, with_quantizer=has_quantizer, vocab=vocab if has_head else None, init=False)
    expected = set(model.state_dict())
    if "masked_spec_embed" not in state:  # CTC checkpoints saved with mask_time_prob=0 have none
        state["masked_spec_embed"] = model.masked_spec_embed.detach().clone()
    convert.check_keys(expected, set(state), source)
    for k, v in state.items():
        want = model.state_dict()[k].shape
        if v.shape != want:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config implies {tuple(want)}")
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- fairseq
def _load_fairseq(path: Path) -> Wav2Vec2:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    model_cfg, task_cfg = _fairseq_cfg(ckpt)
    finetuned = "w2v_args" in model_cfg or any(k.startswith("w2v_encoder.") for k in ckpt["model"])
    if finetuned:
        w2v = model_cfg.get("w2v_args") or {}
        w2v = vars(w2v) if isinstance(w2v, argparse.Namespace) else w2v
        inner_model = w2v.get("model", w2v)
        inner_task = w2v.get("task", w2v)
        cfg, norm = convert.config_from_fairseq({**inner_model, "normalize": inner_task.get("normalize", False)})
    else:
        cfg, norm = convert.config_from_fairseq({**model_cfg, "normalize": task_cfg.get("normalize", False)})
    cfg = cfg.replace(do_normalize=norm)
    state = convert.fairseq_to_ours(ckpt["model"], source=str(path))
    vocab = None
    if "lm_head.weight" in state:
        vocab = _fairseq_vocab(path, state["lm_head.weight"].shape[0])
    return _build_from_state(cfg, state, vocab, str(path))


def _fairseq_cfg(ckpt: dict) -> tuple[dict, dict]:
    if ckpt.get("cfg") is not None:
        cfg = ckpt["cfg"]
        return dict(cfg.get("model") or {}), dict(cfg.get("task") or {})
    args = ckpt.get("args")
    if args is not None:
        d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        return d, d
    return {}, {}


def _fairseq_vocab(path: Path, size: int) -> Vocabulary:
    """fairseq keeps the letter dictionary beside the checkpoint (dict.ltr.txt): specials first."""
    d = path.parent / "dict.ltr.txt"
    if d.exists():
        letters = [line.split()[0] for line in d.read_text(encoding="utf-8").splitlines() if line.strip()]
        tokens = ("<pad>", "<s>", "</s>", "<unk>") + tuple(letters)
    elif size == len(LIBRISPEECH_LETTERS):
        tokens = LIBRISPEECH_LETTERS
    else:
        raise CheckpointError(f"{path}: fine-tuned checkpoint with {size} outputs needs its dict.ltr.txt beside it")
    if len(tokens) != size:
        raise CheckpointError(f"{d}: {len(tokens)} tokens but the CTC head has {size} outputs")
    return Vocabulary(tokens)


# --------------------------------------------------------------------------- atomic writes
def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

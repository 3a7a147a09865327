"""Loading and saving models: Hugging Face layout (also our own format), Hub ids, fairseq files.

Our checkpoints *are* Hugging Face directories (config.json, model.safetensors, vocab.json,
preprocessor_config.json), so anything we write loads in transformers and vice versa.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import convert
from .audio import SAMPLE_RATE
from .config import PRESETS, ModelConfig, preset
from .fairseq_format import read_fairseq
from .fileio import atomic_write_bytes, atomic_write_text, verify_checksums
from .model import Wav2Vec2, build_model
from .run_layout import LAST, checkpoint_dirs
from .safeload import CheckpointError, first_line, read_json, regular_file, torch_load
from .vocab import Vocabulary

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default_model"
ONNX_GRAPH = "model.onnx"  # in a directory written by ``w2v2 export --onnx``
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "vocab.json",
             "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json"]
# Inside a training run directory, the model that stands for the run, in order of preference.
RUN_DIR_MODELS = ("best", LAST)
# Suffixes of a fairseq/PyTorch checkpoint file; with the others a name is taken for a local path
# (never for a Hugging Face id) when nothing is there.
FAIRSEQ_SUFFIXES = (".pt", ".pth", ".ckpt")
LOCAL_SUFFIXES = FAIRSEQ_SUFFIXES + (".bin", ".safetensors", ".json")

DEFAULT_MODEL_CARD = "w2v2_default.json"  # in DEFAULT_MODEL_DIR: what the model is and how well it does


def default_model_notice() -> str | None:
    """One line for users of the embedded default model: what it is and how accurate it is (from
    its model card), or None when no default model is embedded."""
    try:
        card = json.loads((DEFAULT_MODEL_DIR / DEFAULT_MODEL_CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card.get("notice")


# --------------------------------------------------------------------------- public API
def load_model(source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
               with_quantizer: bool | None = None) -> Wav2Vec2:
    """Load a model from a local Hugging Face-layout directory (ours too), a Hub id, or a fairseq ``.pt``.

    A training run directory loads its ``best/`` model, else its newest checkpoint. A directory
    with a ``model.onnx`` (``w2v2 export --onnx``), or the ``.onnx`` file itself, loads as a
    :class:`w2v2.onnx.OnnxModel` run by onnxruntime.

    ``source=None`` or ``"default"`` loads the default model embedded in the package. The model is
    returned in eval mode. ``with_quantizer=False`` drops pretraining modules when present.
    """
    path = find_model(source)
    if path.suffix == ".onnx" or (path.is_dir() and (path / ONNX_GRAPH).exists()):
        return _load_onnx(path).to(device)
    if path.is_dir():
        model = _load_hf_dir(path)
    elif path.suffix in FAIRSEQ_SUFFIXES:
        model = _build_from_state(*read_fairseq(path), str(path))
    elif (path.parent / "config.json").is_file():
        raise CheckpointError(f"{path}: a file of a model directory; pass the directory ({path.parent}) instead")
    else:
        raise CheckpointError(f"{path}: not a model directory or a fairseq .pt checkpoint")
    if with_quantizer is False:
        model.without_quantizer()
    return model.to(device).eval()


def save_pretrained(model: Wav2Vec2, directory: str | os.PathLike, weights: bool = True,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write Hugging Face layout: ``Wav2Vec2ForCTC`` when the model has a CTC head, else
    ``Wav2Vec2ForPreTraining`` (with quantizer) or ``Wav2Vec2Model``. Every file is written atomically.
    ``weights=False`` writes all but the weights (an ONNX export carries them in its graph);
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    if model.lm_head is not None:
        arch = "Wav2Vec2ForCTC"
    elif model.quantizer is not None:
        arch = "Wav2Vec2ForPreTraining"
    else:
        arch = "Wav2Vec2Model"
    state = {k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if arch == "Wav2Vec2ForCTC":  # the quantizer is dropped from fine-tuned models
        state = {k: v for k, v in state.items() if not k.startswith(("quantizer.", "project_hid.", "project_q."))}
    # Wav2Vec2Model's own keys carry no prefix; the heads' models nest it under "wav2vec2."
    hf_state = state if arch == "Wav2Vec2Model" else convert.ours_to_hf(state)
    pad = model.vocab.blank_index if model.vocab is not None else 0
    if weights:
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


RANDOM = "random:"  # an --init spec of a model trained from scratch


def random_init_config(spec: str) -> ModelConfig | None:
    """The architecture named by ``random:PRESET`` (tiny, small, base, large) or
    ``random:CONFIG.json`` (a ``config.json`` with Hugging Face field names), for a model trained
    from scratch; None when ``spec`` names a model to load instead. Raises CheckpointError for an
    unknown preset or an unusable config, and for a model too large for this machine's memory."""
    if not spec.startswith(RANDOM):
        return None
    name = spec[len(RANDOM):]
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not os.path.lexists(path):
            raise CheckpointError(f"{name}: no such file or directory")
        cfg = convert.config_from_hf(read_json(path), source=str(path))
    elif name in PRESETS:
        cfg = preset(name)
    else:
        raise CheckpointError(f"{spec}: unknown preset {name!r}; use {RANDOM}{f' or {RANDOM}'.join(PRESETS)} or "
                              f"{RANDOM}CONFIG.json")
    _check_fits_memory(cfg, spec)
    return cfg


def _check_fits_memory(cfg: ModelConfig, what: str) -> None:
    """Refuse an architecture whose float32 weights alone exceed this machine's memory (counted on
    the meta device: nothing is allocated)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(cfg, with_quantizer=True, init=False).parameters())
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: nothing to compare with
        return
    if 4 * params > memory:
        raise CheckpointError(f"{what}: a model of {params / 1e9:.1f}G parameters needs {4 * params / 2**30:.0f} GiB "
                              f"for its weights alone, more than this machine's {memory / 2**30:.0f} GiB")


# --------------------------------------------------------------------------- resolution
def find_model(source, *, download: bool = True) -> Path | None:
    """The local path of the model ``source`` names (see :func:`load_model`), downloading a Hub id
    unless ``download`` is False (then None stands for "a Hub id"). Raises CheckpointError for a
    local path that is not there."""
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
    if os.path.lexists(path):  # a dangling link or a loop: say which
        try:
            os.stat(path)
        except OSError as e:
            raise CheckpointError(f"{source}: {os.strerror(e.errno)} (a symbolic link that leads nowhere)") from None
    text = str(source)
    if not _looks_local(text):
        return _download(text) if download else None
    raise CheckpointError(f"{source}: no such file or directory")


def _looks_local(text: str) -> bool:
    """Whether a name that does not exist is a mistyped local path rather than a Hugging Face id:
    anything but ``org/name``, a name starting with ``.``, ``~`` or ``/``, a checkpoint or weights
    file suffix, or a first component that is a local directory (``runs/typo``)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "~", "/")):
        return True
    return text.lower().endswith(LOCAL_SUFFIXES) or Path(text.split("/")[0]).is_dir()


def _run_dir_model(path: Path) -> Path:
    """A training run directory (no config.json of its own) stands for its ``best/`` model when it
    has one (fine-tuning keeps the lowest validation WER there), else its newest checkpoint."""
    if not path.is_dir() or (path / "config.json").exists():
        return path
    for name in RUN_DIR_MODELS:
        if (path / name / "config.json").exists():
            return (path / name).resolve()
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
            f"{repo_id}: no such local file or directory, and cannot download it from the Hugging Face Hub "
            f"({type(e).__name__}: {first_line(e)}). Offline? Download it elsewhere and pass the local directory "
            f"instead."
        ) from e


# --------------------------------------------------------------------------- Hugging Face layout
def _read_config(path: Path) -> tuple[ModelConfig, dict]:
    """The model config of a Hugging Face-layout directory, and its config.json as read."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face-layout model directory)")
    hf_cfg = read_json(cfg_path)
    cfg = convert.config_from_hf(hf_cfg, source=str(cfg_path))
    if cfg.sampling_rate != SAMPLE_RATE:
        raise CheckpointError(f"{cfg_path}: the model takes audio at sampling_rate {cfg.sampling_rate}; w2v2 reads "
                              f"all audio at {SAMPLE_RATE} Hz")
    pre = path / "preprocessor_config.json"
    if pre.exists():
        cfg = _with_preprocessor(cfg, read_json(pre), pre)
    return cfg, hf_cfg


def _read_vocab(path: Path) -> Vocabulary | None:
    """The vocabulary of a Hugging Face-layout directory (vocab.json), None when it has none."""
    if not (path / "vocab.json").exists():
        return None
    try:
        return Vocabulary.from_json(read_json(path / "vocab.json"), path / "vocab.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _load_onnx(path: Path):
    """An exported graph with the config and vocabulary of its folder, run by onnxruntime."""
    graph, folder = (path, path.parent) if path.suffix == ".onnx" else (path / ONNX_GRAPH, path)
    if not graph.is_file():
        raise CheckpointError(f"{graph}: not a file")
    cfg, _ = _read_config(folder)
    vocab = _read_vocab(folder)
    if vocab is None:
        raise CheckpointError(f"{folder}: no vocab.json beside the ONNX graph (export it with w2v2 export --onnx)")
    try:
        from .onnx import OnnxModel

        return OnnxModel(graph, cfg.replace(vocab_size=len(vocab)), vocab)
    except ImportError as e:
        raise CheckpointError(f"{graph}: running ONNX models needs onnxruntime (pip install 'w2v2[onnx]')") from e
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def _load_hf_dir(path: Path) -> Wav2Vec2:
    cfg, hf_cfg = _read_config(path)
    raw = _read_weights(path)
    archs = hf_cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else "?"
    if arch == "Wav2Vec2Model" or not any(k.startswith("wav2vec2.") for k in raw):
        raw = {"wav2vec2." + k: v for k, v in raw.items()}
    state = convert.hf_to_ours(raw, source=str(path))
    return _build_from_state(cfg, state, _read_vocab(path), str(path))


def _with_preprocessor(cfg: ModelConfig, pre: object, path: Path) -> ModelConfig:
    """The feature extractor's settings that change the model's input: normalisation and the rate."""
    if not isinstance(pre, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(pre).__name__}")
    normalize = pre.get("do_normalize", True)
    if not isinstance(normalize, bool):
        raise CheckpointError(f"{path}: do_normalize must be true or false, got {normalize!r}")
    rate = pre.get("sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise CheckpointError(f"{path}: the model takes audio at sampling_rate {rate!r}; w2v2 reads all audio at "
                              f"{SAMPLE_RATE} Hz")
    return cfg.replace(do_normalize=normalize)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    try:  # a training checkpoint records the SHA-256 of its files
        verify_checksums(path, names=["config.json", st.name, index.name, binf.name])
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if st.exists():
        return _read_safetensors(st)
    if index.exists():
        listing = read_json(index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(s, str) and s and Path(s).name == s for s in weight_map.values()):
            raise CheckpointError(f"{index}: expected a weight_map of tensor names to shard files in this directory")
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_read_safetensors(path / shard))
        return out
    if binf.exists():
        state = torch_load(binf)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{binf}: not a state dict (names -> tensors)")
        return {k: v.clone() for k, v in state.items()}  # out of the mapped file: it may change later
    if (path / "pytorch_model.bin.index.json").exists():
        raise CheckpointError(f"{path}: sharded pytorch_model-*.bin weights are not supported; convert them to "
                              f"safetensors (transformers: save_pretrained(..., safe_serialization=True))")
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; its header is checked against the file's size before any is read."""
    regular_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupted or truncated weights ({first_line(e)})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e


def _build_from_state(cfg: ModelConfig, state: dict, vocab: Vocabulary | None, source: str) -> Wav2Vec2:
    """The model for ``cfg`` holding ``state``. It is laid out on the meta device (no memory) and
    checked against the weights' shapes first, so that a config that does not match its weights
    (a typo, or a hostile file asking for a million layers) is refused before anything is allocated;
    the loaded tensors then become the parameters (no second copy)."""
    has_head = "lm_head.weight" in state
    has_quantizer = "quantizer.codevectors" in state
    try:
        if has_head:
            n = state["lm_head.weight"].shape[0]
            if vocab is not None and len(vocab) != n:
                raise CheckpointError(f"{source}: vocab.json has {len(vocab)} tokens but the CTC head has {n} outputs")
            cfg = cfg.replace(vocab_size=n)
        else:
            cfg = cfg.replace(vocab_size=None)
    except ValueError as e:  # a head of 0 or of millions of outputs
        raise CheckpointError(f"{source}: {e}") from e
    _check_layer_counts(cfg, state, source)
    with torch.device("meta"):
        model = build_model(cfg, with_quantizer=has_quantizer, vocab=vocab if has_head else None, init=False)
    expected = model.state_dict()
    convert.check_keys(set(expected), set(state) | {"masked_spec_embed"}, source)
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the config implies "
                                  f"{tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise CheckpointError(f"{source}: {k} holds {v.dtype} values, expected floating point weights")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: {k} holds NaN or infinite values; such a model outputs nothing "
                                  f"meaningful (a diverged training run?)")
    state = {k: v.to(torch.float32) for k, v in state.items()}
    if "masked_spec_embed" not in state:  # CTC checkpoints saved with mask_time_prob=0 have none
        state["masked_spec_embed"] = torch.empty(cfg.hidden_size).uniform_()
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _check_layer_counts(cfg: ModelConfig, state: dict, source: str) -> None:
    """The numbers of Transformer and conv layers the weights hold must be the config's: the only
    config values that cost memory even on the meta device."""
    for what, prefix, want in (("Transformer layers", "encoder.layers.", cfg.num_hidden_layers),
                               ("conv layers", "feature_extractor.conv_layers.", len(cfg.conv_dim))):
        found = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
        if found != set(range(want)):
            raise CheckpointError(f"{source}: the config asks for {want} {what} but the weights hold "
                                  f"{len(found)}" + ("" if found == set(range(len(found))) else
                                                     f" (numbered {sorted(found)[:8]}...)"))


# --------------------------------------------------------------------------- atomic writes
def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

"""fairseq checkpoints (``.pt``) as fairseq wrote them, read as a config, a state dict in our
naming and the letter vocabulary. Every layout of its options: a flat ``args`` Namespace (to
October 2020), a pickled omegaconf ``DictConfig`` ``cfg`` (October 2020 to March 2021, read through
an allowlist of omegaconf's data classes), a plain ``cfg`` dict (later)."""

from __future__ import annotations

import argparse
import collections
import typing
from pathlib import Path

import torch

from . import convert
from .config import ModelConfig
from .safeload import CheckpointError, regular_file, torch_load
from .vocab import Vocabulary

# The letter dictionary of every LibriSpeech fine-tuned fairseq model (dict.ltr.txt), blank first.
LIBRISPEECH_LETTERS = ("<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A", "O", "N", "I", "H", "S", "R", "D",
                       "L", "U", "M", "W", "C", "F", "G", "Y", "P", "B", "V", "K", "'", "X", "J", "Q", "Z")
MAX_NESTING = 32  # of a checkpoint's options


def read_fairseq(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Vocabulary | None]:
    """(config, state dict in our naming, vocabulary of a fine-tuned model) of a fairseq ``.pt``."""
    ckpt = torch_load(path, fairseq_globals())
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry of weights)")
    weights = ckpt["model"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()):
        raise CheckpointError(f"{path}: its 'model' entry is not a state dict (names -> tensors)")
    model_cfg, normalize = _options(ckpt, weights, path)
    cfg = convert.config_from_fairseq(model_cfg, normalize, source=str(path))
    state = convert.fairseq_to_ours(weights, source=str(path))
    state = {k: v.clone() for k, v in state.items()}  # out of the mapped file: it may change later
    vocab = None
    if "lm_head.weight" in state:
        vocab = _letters(path, state["lm_head.weight"].shape[0])
    return cfg, state, vocab


def fairseq_globals() -> list:
    """What fairseq pickled besides tensors, all plain data: argparse Namespaces (``args``, to
    October 2020) and, when omegaconf is installed, the parts of an omegaconf DictConfig (``cfg``,
    October 2020 to March 2021; later fairseq saves a plain dict). The unpickler builds these
    classes from the file's data with their own code; any other class or function the file names
    is refused, so the file cannot choose what runs."""
    allowed = [argparse.Namespace]
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode, BooleanNode, FloatNode, IntegerNode, StringNode
    except ImportError:
        return allowed
    return allowed + [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, BooleanNode, FloatNode,
                      IntegerNode, StringNode, typing.Any, dict, list, int, collections.defaultdict]


def _options(ckpt: dict, weights: dict, path: Path) -> tuple[dict, bool]:
    """(options of the wav2vec 2.0 model, whether its input is normalised) from every layout
    fairseq wrote: ``args`` (a flat argparse Namespace; a fine-tuned model's ``w2v_args`` is another
    one), or ``cfg`` (a DictConfig, later a dict, with ``model`` and ``task`` sections; a fine-tuned
    model's ``model.w2v_args`` is the pretrained model's cfg, or a flat Namespace)."""
    if ckpt.get("cfg") is not None:
        top = _plain(ckpt["cfg"], path)
        model = top.get("model") if isinstance(top, dict) else None
        task = top.get("task") if isinstance(top, dict) else None
    elif ckpt.get("args") is not None:
        model = task = _plain(ckpt["args"], path)  # one flat namespace
    else:
        raise CheckpointError(f"{path}: neither 'cfg' nor 'args': the checkpoint does not say its architecture")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: its options have no model section")
    task = task if isinstance(task, dict) else {}
    if "w2v_args" in model or any(k.startswith("w2v_encoder.") for k in weights):
        convert.check_fairseq_options(model, convert.FAIRSEQ_FIXED_CTC, str(path))
        inner = model.get("w2v_args")
        if not isinstance(inner, dict):
            raise CheckpointError(f"{path}: a fine-tuned checkpoint without the pretrained model's options "
                                  f"(w2v_args)")
        nested = isinstance(inner.get("model"), dict)  # a cfg with sections, or one flat namespace
        inner_model = inner["model"] if nested else inner
        inner_task = (inner.get("task") if isinstance(inner.get("task"), dict) else {}) if nested else inner
        # fairseq refuses to fine-tune with another normalisation than pretraining's
        normalize = task.get("normalize", inner_task.get("normalize", model.get("normalize", False)))
        return inner_model, normalize
    return model, task.get("normalize", False)


def _plain(obj: object, path: Path, depth: int = 0) -> object:
    """fairseq options as dicts and lists: argparse Namespaces and omegaconf containers unpacked
    (interpolations are left as written: nothing is evaluated)."""
    if depth > MAX_NESTING:
        raise CheckpointError(f"{path}: its options are nested more than {MAX_NESTING} deep")
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    elif type(obj).__module__.split(".")[0] == "omegaconf":
        from omegaconf import OmegaConf
        obj = OmegaConf.to_container(obj, resolve=False)
    if isinstance(obj, dict):
        return {k: _plain(v, path, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, path, depth + 1) for v in obj]
    return obj


def _letters(path: Path, size: int) -> Vocabulary:
    """fairseq keeps the letter dictionary beside the checkpoint (dict.ltr.txt): specials first."""
    d = path.parent / "dict.ltr.txt"
    if d.exists():
        regular_file(d)
        try:
            lines = d.read_bytes().decode("utf-8").splitlines()
            tokens = ("<pad>", "<s>", "</s>", "<unk>") + tuple(line.split()[0] for line in lines if line.strip())
            vocab = Vocabulary(tokens)
        except OSError as e:
            raise CheckpointError(f"{d}: cannot read ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{d}: not UTF-8 text (byte {e.start})") from e
        except ValueError as e:
            raise CheckpointError(f"{d}: {e}") from e
        if len(vocab) != size:
            raise CheckpointError(f"{d}: {len(vocab)} tokens but the CTC head has {size} outputs")
        return vocab
    if size == len(LIBRISPEECH_LETTERS):
        return Vocabulary(LIBRISPEECH_LETTERS)
    raise CheckpointError(f"{path}: fine-tuned checkpoint with {size} outputs needs its dict.ltr.txt beside it")

"""Architecture of a wav2vec 2.0 model: one dataclass, stored inside every checkpoint.

Field names follow Hugging Face's ``Wav2Vec2Config`` so that a ``config.json`` maps onto
:class:`ModelConfig` field by field. Presets are plain functions (``tiny``, ``small``,
``base``, ``large``), never flags inside modules. Below it, what every options dataclass of the
package uses: checking values against the fields, and fields that carry their own help.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    # Feature encoder (waveform X -> latent frames Z, 20 ms stride with the default kernels).
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"  # "group": GroupNorm after conv 0 (BASE); "layer": LayerNorm after each
    # Transformer (Z -> context C).
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    do_stable_layer_norm: bool = False  # pre-LN ("stable layer norm", LARGE-lv60) instead of post-LN
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    # Regularisation (training only).
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.1
    final_dropout: float = 0.0
    layerdrop: float = 0.05
    # Product quantizer (Z -> targets Q) and pretraining projections.
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 320
    codevector_dim: int = 256
    proj_codevector_dim: int = 256
    # CTC head: present when vocab_size is set.
    vocab_size: int | None = None
    # Input normalisation applied by the model itself: zero mean, unit variance per utterance,
    # (x - mean) / sqrt(var + normalize_eps). transformers' feature extractor uses 1e-7; fairseq
    # applies F.layer_norm over the waveform, whose eps is 1e-5 (it matters on quiet audio).
    do_normalize: bool = True
    normalize_eps: float = 1e-7
    sampling_rate: int = 16000

    def __post_init__(self) -> None:
        problems = check_fields(ModelConfig, dataclasses.asdict(self), "")
        if problems:  # wrong types first: the range checks below would fail on them with TypeErrors
            raise ValueError("; ".join(problems))
        self.conv_dim = tuple(self.conv_dim)
        self.conv_kernel = tuple(self.conv_kernel)
        self.conv_stride = tuple(self.conv_stride)
        problems = _range_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def frame_stride(self) -> int:
        """Samples between two latent frames (320 = 20 ms at 16 kHz for the standard encoder)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one latent frame (400 = 25 ms for the standard encoder)."""
        rf = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            rf = (rf - 1) * s + k
        return rf

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from a dict, ignoring unknown keys (so a full HF config.json works). Raises
        ValueError naming every field of the wrong type or out of range."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object of model options, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Bounds that no wav2vec 2.0 model comes near (XLS-R 2B: 48 layers, 1920 wide, FFN 7680): a config
# outside them is a typo or a hostile file, refused before anything is allocated for it.
MAX_LAYERS = 1024
MAX_CONV_LAYERS = 64
MAX_WIDTH = 1 << 16  # conv channels, hidden size, codevector sizes
MAX_FFN = 1 << 18
MAX_KERNEL = 4096  # conv kernels, strides and the positional convolution's kernel
MAX_VOCAB = 1 << 20
MAX_RATE = 1_000_000  # samples per second
DROPOUTS = ("hidden_dropout", "attention_dropout", "activation_dropout", "feat_proj_dropout", "final_dropout",
            "layerdrop")


def _range_problems(c: ModelConfig) -> list[str]:
    """Values of a well-typed config that no model can be built from (or that are absurdly large)."""
    problems = []

    def bounded(name: str, value: int, hi: int, lo: int = 1) -> None:
        if not lo <= value <= hi:
            problems.append(f"{name} must be {lo}..{hi}, got {value}")

    n = len(c.conv_dim)
    if not n == len(c.conv_kernel) == len(c.conv_stride):
        problems.append(f"conv_dim, conv_kernel and conv_stride must have the same length, got "
                        f"{n}, {len(c.conv_kernel)}, {len(c.conv_stride)}")
    bounded("the number of conv layers (len(conv_dim))", n, MAX_CONV_LAYERS)
    for name, values, hi in (("conv_dim", c.conv_dim, MAX_WIDTH), ("conv_kernel", c.conv_kernel, MAX_KERNEL),
                             ("conv_stride", c.conv_stride, MAX_KERNEL)):
        bad = [v for v in values if not 1 <= v <= hi]
        if bad:
            problems.append(f"{name} entries must be 1..{hi}, got {list(values)}")
    if c.feat_extract_norm not in ("group", "layer"):
        problems.append(f"feat_extract_norm must be 'group' or 'layer', got {c.feat_extract_norm!r}")
    bounded("hidden_size", c.hidden_size, MAX_WIDTH)
    bounded("num_hidden_layers", c.num_hidden_layers, MAX_LAYERS, lo=0)  # 0: the feature encoder alone
    bounded("num_attention_heads", c.num_attention_heads, MAX_WIDTH)
    bounded("intermediate_size", c.intermediate_size, MAX_FFN)
    bounded("num_conv_pos_embeddings", c.num_conv_pos_embeddings, MAX_KERNEL)
    bounded("num_conv_pos_embedding_groups", c.num_conv_pos_embedding_groups, MAX_WIDTH)
    bounded("num_codevector_groups", c.num_codevector_groups, MAX_WIDTH)
    bounded("num_codevectors_per_group", c.num_codevectors_per_group, MAX_WIDTH)
    bounded("codevector_dim", c.codevector_dim, MAX_WIDTH)
    bounded("proj_codevector_dim", c.proj_codevector_dim, MAX_WIDTH)
    if c.vocab_size is not None:
        bounded("vocab_size", c.vocab_size, MAX_VOCAB)
    for name, total, parts in (("hidden_size", c.hidden_size, "num_attention_heads"),
                               ("hidden_size", c.hidden_size, "num_conv_pos_embedding_groups"),
                               ("codevector_dim", c.codevector_dim, "num_codevector_groups")):
        if getattr(c, parts) >= 1 and total % getattr(c, parts):
            problems.append(f"{name} {total} is not divisible by {parts} {getattr(c, parts)}")
    for name in DROPOUTS:
        if not 0.0 <= getattr(c, name) <= 1.0:
            problems.append(f"{name} must be a probability in [0, 1], got {getattr(c, name)}")
    for name in ("layer_norm_eps", "normalize_eps"):
        if not 0.0 < getattr(c, name) < 1.0:
            problems.append(f"{name} must be in (0, 1), got {getattr(c, name)}")
    bounded("sampling_rate", c.sampling_rate, MAX_RATE)
    return problems


def base(**overrides) -> ModelConfig:
    """BASE: 12 post-LN layers, 768 wide, group-norm feature encoder (95M parameters)."""
    return ModelConfig(**overrides)


def large(**overrides) -> ModelConfig:
    """LARGE-lv60 style: 24 pre-LN layers, 1024 wide, layer-norm feature encoder with conv bias."""
    cfg = dict(
        conv_bias=True,
        feat_extract_norm="layer",
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        do_stable_layer_norm=True,
        codevector_dim=768,
        proj_codevector_dim=768,
        layerdrop=0.1,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def small(**overrides) -> ModelConfig:
    """A few million parameters; pretrains on two CPU cores in minutes per epoch of an hour of audio."""
    cfg = dict(
        conv_dim=(256, 256, 256, 256, 256, 256, 256),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        num_conv_pos_embeddings=64,
        num_conv_pos_embedding_groups=16,
        num_codevector_groups=2,
        num_codevectors_per_group=64,
        codevector_dim=128,
        proj_codevector_dim=128,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        feat_proj_dropout=0.1,
        layerdrop=0.0,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny(**overrides) -> ModelConfig:
    """For tests: seconds to build and run, all code paths intact."""
    cfg = dict(
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_codevector_groups=2,
        num_codevectors_per_group=8,
        codevector_dim=16,
        proj_codevector_dim=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        feat_proj_dropout=0.0,
        layerdrop=0.0,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


PRESETS = {"tiny": tiny, "small": small, "base": base, "large": large}


def preset(name: str, **overrides) -> ModelConfig:
    try:
        return PRESETS[name](**overrides)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------- checking options
MAX_LISTED = 50  # problems shown in one error message


class ConfigError(ValueError):
    """Everything wrong with a run's options (or data listing), found before it starts.

    ``problems`` holds one line per problem; the message lists them all (one line when there is one)."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: Sequence[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    shown = [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        shown.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return f"{len(problems)} problems:\n" + "\n".join(shown)


def check_fields(cls, values: object, where: str) -> list[str]:
    """Problems with ``values`` as keyword arguments of the dataclass ``cls``, checked against its
    field annotations: unknown names (with the closest known one) and values of the wrong type.
    Each problem starts with ``where`` (a config section such as ``train``) when it is not empty."""
    if not isinstance(values, dict):
        return [f"{where}: expected an object of {cls.__name__} options, got {values!r}"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in values if k not in names)
    problems = []
    if unknown:
        hints_for = [difflib.get_close_matches(str(k), names, n=1) for k in unknown]
        guesses = [f"{k} -> {g[0]}" for k, g in zip(unknown, hints_for) if g]
        problems.append(f"{where}: unknown {cls.__name__} options {unknown}"
                        + (f" (did you mean: {', '.join(guesses)}?)" if guesses else ""))
    for key, value in values.items():
        if key in names and not _fits(value, hints[key]):
            problems.append(f"{where}{'.' if where else ''}{key}: expected {_describe(hints[key])}, got {value!r}")
    return problems


def valid_fields(cls, values: object) -> dict:
    """The items of ``values`` that :func:`check_fields` finds no fault with."""
    if not isinstance(values, dict):
        return {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and _fits(v, hints[k])}


DEVICE_HELP = "auto: cuda when available, else cpu; or cpu, cuda, cuda:N"
PROGRESS_HELP = "a progress bar on standard error"


def option(default=dataclasses.MISSING, help: str = "", **cli) -> dataclasses.Field:
    """A dataclass field that documents itself: ``help`` says what it is (the help of its flag in
    the command line, which takes the default from here too); ``cli`` holds argparse settings such
    as ``choices`` or ``metavar``."""
    return field(default=default, metadata={"help": help, "cli": cli})


def redefault(cls, name: str, default) -> dataclasses.Field:
    """The field ``name`` of the dataclass ``cls`` with another default, for a subclass whose
    defaults differ (its help and settings stay those of ``cls``)."""
    parent = {f.name: f for f in dataclasses.fields(cls)}[name]
    return field(default=default, metadata=parent.metadata)


def _fits(value: object, hint) -> bool:
    """Whether a JSON-like ``value`` fits the annotation ``hint`` (bool, int, float, str,
    tuples and lists of them, unions with None); other annotations are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, h) for v, h in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    simple = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_describe(h) for h in args)})"
        return f"a list of ({_describe(args[0])})" if args else "a list"
    return str(hint)

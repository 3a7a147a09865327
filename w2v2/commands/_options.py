"""Command-line options from one source.

An option that sets a field of an options dataclass (``FinetuneConfig``, ``TrainConfig``,
``TranscribeOptions``, ...) is built from that field by :func:`add_fields`: the flag is the
field's name with dashes, its type, default, choices and help come from the field (see
:func:`w2v2.config.option`), and :func:`field_values` reads the parsed values back. Options that
several commands share without a dataclass behind them (``--model``, ``--device``,
``--precision``, ...) are defined once here, in :data:`SHARED`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from ..config import DEVICE_HELP, PROGRESS_HELP


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, once, where there is a default to show: not for
    required options, plain flags, or None (the help then says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        boolean = isinstance(action, argparse.BooleanOptionalAction)
        if ("%(default)" in text or action.required or action.default is None or action.default is argparse.SUPPRESS
                or (action.nargs == 0 and not boolean)):
            return text
        return super()._get_help_string(action)


def integer(text: str) -> int:
    """An int flag's value; 3.2e6 and 1e5 are accepted when they are whole numbers."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _plain_type(hint):
    """``int | None`` -> int; other annotations unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return hint


def _field_argument(cls, name: str, *, defaults: bool = True, help: str | None = None) -> tuple[str, dict]:
    """(flag, argparse keyword arguments) for the field ``name`` of the dataclass ``cls``: its
    default (None with ``defaults=False``: a flag that only overrides when given), type, choices
    and help (the field's own unless ``help`` is given)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = _plain_type(typing.get_type_hints(cls)[name])
    cli = dict(field.metadata.get("cli", {}))
    none = cli.pop("none", None)  # the word that stands for None on the command line
    value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
    kwargs = {"help": (help or field.metadata.get("help", "")).replace("%", "%%"), **cli}
    if value is None and none is not None:
        value = none
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        kwargs.update(nargs=len(typing.get_args(hint)), type=integer if item is int else item)
    elif hint is not str:  # strings need no conversion
        kwargs["type"] = integer if hint is int else hint
    kwargs["default"] = value if defaults else None
    return _flag(name), kwargs


def add_fields(parser, cls, names, *, defaults: bool = True, help: dict[str, str] | None = None) -> None:
    """A flag for each field in ``names`` of the dataclass ``cls`` (see :func:`_field_argument`)."""
    for name in names:
        flag, kwargs = _field_argument(cls, name, defaults=defaults, help=(help or {}).get(name))
        parser.add_argument(flag, **kwargs)


def field_values(cls, args: argparse.Namespace, names, *, given_only: bool = False) -> dict:
    """The parsed values of the flags :func:`add_fields` made, as keyword arguments of ``cls``
    (the word standing for None turned into None, lists into tuples). ``given_only``: only the
    flags given (for flags built with ``defaults=False``)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name in names:
        value = getattr(args, name)
        if value is None and given_only:
            continue
        none = fields[name].metadata.get("cli", {}).get("none")
        if none is not None and value == none:
            value = None
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _precisions() -> tuple[str, ...]:
    from ..precision import PRECISIONS

    return PRECISIONS


# Options that several commands share: one definition each (names, default, choices, help).
SHARED = {
    "--model": lambda: dict(default=None, help="a local model or run directory, a fairseq .pt file or a Hugging Face "
                                               "id; None: the model embedded in the package"),
    "--device": lambda: dict(default="auto", help=DEVICE_HELP),
    "--precision": lambda: dict(
        choices=_precisions(), default="auto",
        help="model arithmetic; auto: bf16 where the hardware multiplies it natively (CUDA GPUs with bf16, CPUs "
             "with AVX512-BF16 or AMX), else fp32; fp32: reference numerics; int8: dynamic int8 matrix products "
             "through onnxruntime (docs/deploy.md)"),
    "--progress": lambda: dict(action=argparse.BooleanOptionalAction, default=True, help=PROGRESS_HELP),
    "--layers": lambda: dict(aliases=("--layer",), default="all",
                             help="'all' (0..N, 0 = Transformer input), one layer N, or a list like 0,6,12 "
                                  "(negative counts from the last); only the layers needed are run"),
    "--resume": lambda: dict(action="store_true", help="continue the run in --out from its last checkpoint (a fresh "
                                                       "start when it has none)"),
    "--batch-size": lambda: dict(type=int, default=8, help="files per forward pass (sorted by duration)"),
    "--skip-existing": lambda: dict(action="store_true",
                                    help="skip inputs whose output files (every one asked for) all exist in "
                                         "--output-dir: a restarted job redoes only the rest"),
}


def add_shared(parser, *flags: str) -> None:
    """The options ``flags`` as :data:`SHARED` defines them."""
    for flag in flags:
        kwargs = SHARED[flag]()
        parser.add_argument(flag, *kwargs.pop("aliases", ()), **kwargs)

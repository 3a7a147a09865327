"""ONNX export and an onnxruntime-backed model that transcribes like :class:`w2v2.Wav2Vec2`.

    export_onnx(model, "out/model.onnx")          # the plain forward, traced
    model = OnnxModel("out/model.onnx", config, vocab)   # or w2v2.load_model("out")
    model(wav, lengths).logits                    # (batch, frames, vocab) float32

The graph takes ``waveforms`` (batch, samples) float32, zero-padded, and ``lengths`` (batch,)
int64 valid samples; it returns ``logits`` (batch, frames, vocab) and ``frame_lengths`` (batch,).
Batch and length axes are dynamic. It is the plain path (``w2v2.fast`` off) traced with a padded
example, so every item is normalised, group-normed and attended over its own valid samples only:
a padded item gives the logits it gives alone. Two parts are restated for onnxruntime, computing
the same function: the feature encoder runs channels last with each convolution as one ``MatMul``
of strided windows and conv 0's group norm folded into its weights (:class:`_ConvsAsProducts`),
and the attention masks are finite (:func:`_finite_attention_masks`).

Why the TorchScript exporter: the dynamo exporter (``torch.export``) refuses the forward's
data-dependent Python branches (input checks such as "a length exceeds the padded size", and the
shortcut that skips the attention mask when nothing is padded). The tracer records the padded
path, which is the same function on unpadded input (docs/deploy.md).

int8: :func:`quantize_onnx` rewrites the Transformer's matrix products (``MatMul``: projections,
feed-forwards, the feature projection and the CTC head) to dynamic int8 with onnxruntime (weights
per output channel, activations per call); the feature encoder, norms and attention scores stay
float32.
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .config import ModelConfig
from .fast.layers import fold_group_norm
from .fileio import atomic_write_bytes
from .model import ModelOutput, Wav2Vec2
from .modules import FeatureEncoder, conv_output_lengths
from .safeload import first_line
from .vocab import Vocabulary

OPSET = 17  # LayerNormalization is an op from 17; onnxruntime's CPU and CUDA providers run it
INPUTS = ("waveforms", "lengths")
OUTPUTS = ("logits", "frame_lengths")


class _CtcGraph(torch.nn.Module):
    """What the graph computes: waveforms, lengths -> logits, frame lengths."""

    def __init__(self, model: Wav2Vec2):
        super().__init__()
        self.model = model

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(waveforms, lengths)
        return out.logits, out.lengths


def windows(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """(batch, time, channels) -> (batch, frames, kernel * channels): the input of each frame of an
    unpadded convolution, ordered (kernel position, channel). Static strided slices, so the graph
    keeps a dynamic time axis (``Tensor.unfold`` does not export with one)."""
    taps = [x[:, tau : tau - (kernel - 1) or None : stride] for tau in range(kernel)]
    return torch.cat(taps, dim=-1)


class _ConvsAsProducts(nn.Module):
    """The feature encoder computed channels last, each convolution as one matrix product of its
    input's windows (onnxruntime runs a ``MatMul`` with its GEMM, faster than its ``Conv`` on these
    shapes), conv 0's group norm folded into its weights as in the fast path. Returns what
    ``FeatureEncoder.forward`` returns, (batch, channels, frames)."""

    def __init__(self, encoder: FeatureEncoder):
        super().__init__()
        self.encoder = encoder
        self.output_lengths = encoder.output_lengths

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = wav[:, :, None]  # (batch, samples, 1)
        for layer in self.encoder.conv_layers:
            conv = layer.conv
            k, s = conv.kernel_size[0], conv.stride[0]
            if lengths is not None:
                lengths = conv_output_lengths(lengths, (k,), (s,))
            if layer.norm_kind == "group":  # conv 0: the norm folded into per-utterance weights
                u = windows(x, k, s)  # (batch, frames, kernel)
                w, b = fold_group_norm(layer, u.double(), lengths, torch.float32)
                x = F.gelu(u @ w.transpose(1, 2) + b[:, None])
                continue
            w = conv.weight.permute(2, 1, 0).reshape(k * conv.in_channels, conv.out_channels)  # (kernel*in, out)
            x = windows(x, k, s) @ w  # (batch, frames, out)
            if conv.bias is not None:
                x = x + conv.bias
            if layer.norm_kind == "layer":
                x = layer.layer_norm(x)
            x = F.gelu(x)
        return x.transpose(1, 2)


def export_onnx(model: Wav2Vec2, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``model`` (a CTC model) as an ONNX graph at ``path``, atomically; the model is unchanged."""
    if model.lm_head is None:
        raise ValueError("ONNX export needs a CTC model (with an lm_head); this one has none")
    if model.device.type != "cpu":  # traced on the CPU; the caller's model stays where it is
        model = copy.deepcopy(model).cpu()
    was_training = model.training
    samples = 4 * model.config.receptive_field + model.config.frame_stride * 8
    # Padded in the second item: the tracer records the masked path, which every batch then takes.
    example = (torch.randn(2, samples), torch.tensor([samples, samples // 2]))
    buf = io.BytesIO()
    with fast.disabled(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about the Python checks it bakes in
        model.eval()
        encoder = model.feature_extractor
        model.feature_extractor = _ConvsAsProducts(encoder)
        try:
            _trace(model, example, buf, opset)
        finally:
            model.feature_extractor = encoder
            model.train(was_training)
    path = Path(path)
    atomic_write_bytes(path, _finite_attention_masks(buf.getvalue()))
    return path


def _finite_attention_masks(graph_bytes: bytes) -> bytes:
    """The traced graph with each attention mask's -inf replaced by float32's lowest value and the
    NaN guard after the softmax (``IsNaN`` -> ``Where`` over every score, which the exporter adds
    for rows whose keys are all masked) removed: with a finite mask such a row (an item with no
    valid frame) averages its values instead of giving NaN, and no other row changes (its masked
    keys still get a weight of exactly 0). The guard is a pass over (batch, heads, frames, frames)."""
    import onnx

    model = onnx.load_from_string(graph_bytes)
    nodes = model.graph.node
    by_output = {o: n for n in nodes for o in n.output}
    rename, drop = {}, set()
    for n in nodes:
        guard = by_output.get(n.input[0]) if n.op_type == "Where" and n.input else None
        if guard is None or guard.op_type != "IsNaN" or guard.input[0] != n.input[2]:
            continue
        softmax = by_output.get(n.input[2])
        add = by_output.get(softmax.input[0]) if softmax is not None and softmax.op_type == "Softmax" else None
        if add is None or add.op_type != "Add":
            continue
        rename[n.output[0]] = n.input[2]
        drop.update((id(n), id(guard)))
        for name in add.input:
            where = by_output.get(name)
            if where is not None and where.op_type == "Where":
                _make_finite(by_output.get(where.input[2]))
    kept = [n for n in nodes if id(n) not in drop]
    for n in kept:
        n.input[:] = [rename.get(i, i) for i in n.input]
    used = {i for n in kept for i in n.input} | {rename.get(o.name, o.name) for o in model.graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in used]  # the guards' zeros
    for o in model.graph.output:
        o.name = rename.get(o.name, o.name)
    del nodes[:]
    nodes.extend(kept)
    return model.SerializeToString()


def _make_finite(constant) -> None:
    """Set a ``Constant`` node holding -inf to float32's lowest finite value."""
    from onnx import numpy_helper

    if constant is None or constant.op_type != "Constant":
        return
    for attr in constant.attribute:
        if attr.name == "value":
            value = numpy_helper.to_array(attr.t)
            if value.dtype == np.float32 and np.isneginf(value).all():
                attr.t.CopyFrom(numpy_helper.from_array(np.full_like(value, np.finfo(np.float32).min), attr.t.name))


def _trace(model: Wav2Vec2, example: tuple, buf: io.BytesIO, opset: int) -> None:
    torch.onnx.export(
        _CtcGraph(model), example, buf, input_names=list(INPUTS), output_names=list(OUTPUTS),
        opset_version=opset, dynamo=False,
        dynamic_axes={"waveforms": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
                      "logits": {0: "batch", 1: "frames"}, "frame_lengths": {0: "batch"}},
    )


def quantize_onnx(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 weights and activations for the matrix products of graph ``src``, written to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        out = Path(tmp) / dst.name
        logging.disable(logging.WARNING)  # its advice to pre-process applies to static quantization
        try:
            quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                             weight_type=QuantType.QInt8, nodes_to_exclude=_feature_encoder_products(src))
        finally:
            logging.disable(logging.NOTSET)
        atomic_write_bytes(dst, out.read_bytes())
    return dst


def _feature_encoder_products(path: str | os.PathLike) -> list[str]:
    """The feature encoder's ``MatMul`` nodes in graph ``path``: its convolutions stay float32 in
    int8, since int8 activations there cost too much accuracy (docs/deploy.md)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "/feature_extractor/" in n.name]


def for_precision(model, precision: str):
    """``model`` ready to run at ``precision``: int8 runs through onnxruntime, so a PyTorch model
    is exported to a temporary graph first (``w2v2 export --onnx`` once saves that cost)."""
    if precision != "int8" or isinstance(model, OnnxModel):
        return model
    tmp = tempfile.TemporaryDirectory()
    onnx_model = OnnxModel(export_onnx(model, Path(tmp.name) / "model.onnx"), model.config, model.vocab)
    onnx_model._tmp = tmp  # removed with the model
    return onnx_model.to(model.device)


def graph_precision(model, precision: str) -> str:
    """The precision ``model`` runs when asked for ``precision`` (``fp32``, ``bf16`` or ``int8``):
    an :class:`OnnxModel` runs its float32 graph for anything but ``int8``."""
    if isinstance(model, OnnxModel):
        return "int8" if precision == "int8" else "fp32"
    return precision


class _Head:
    """Stands for the CTC head the transcription path checks for (``model.lm_head is not None``)."""

    def __init__(self, vocab_size: int):
        self.out_features = vocab_size


class OnnxModel:
    """An exported graph run by onnxruntime, with the parts of :class:`w2v2.Wav2Vec2` that
    transcription, alignment and evaluation use: ``config``, ``vocab``, ``lm_head``, ``forward``
    (``model(wav, lengths)`` -> :class:`w2v2.ModelOutput` with logits and lengths),
    ``num_frames``, ``set_precision`` (``fp32``; ``int8`` runs the quantized graph), ``to``
    (``cpu`` or ``cuda``: the execution provider) and ``eval``.

    ``precision="int8"`` quantizes the fp32 graph once (:func:`quantize_onnx`) into a
    ``model.int8.onnx`` beside it, or a temporary folder when that folder is read-only.
    """

    training = False

    def __init__(self, path: str | os.PathLike, config: ModelConfig, vocab: Vocabulary | None,
                 threads: int | None = None):  # threads: None follows torch.get_num_threads()
        self.path = Path(path)
        self.config = config
        self.vocab = vocab
        self.lm_head = _Head(config.vocab_size or (len(vocab) if vocab else 0))
        self.threads = threads
        self.precision = "fp32"
        self._device = torch.device("cpu")
        self._sessions: dict[tuple[str, str], object] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None  # holds a graph written for this model only
        self._session()  # fail at load on a bad graph, not at the first batch

    # ------------------------------------------------------------------ the model's interface
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> "OnnxModel":
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"onnxruntime runs on cpu or cuda, not {device}")
        self._device = device
        return self

    def eval(self) -> "OnnxModel":
        return self

    def set_precision(self, precision: str) -> "OnnxModel":
        """``fp32`` (``auto`` and ``bf16`` mean fp32 here: the graph is float32) or ``int8``."""
        self.precision = graph_precision(self, precision)
        return self

    def parameters(self) -> Iterator[torch.Tensor]:
        """The graph's weights as shape-only (meta) tensors: enough to count them."""
        import onnx

        graph = onnx.load(str(self.path), load_external_data=False).graph
        for init in graph.initializer:
            yield torch.empty(tuple(init.dims), device="meta")

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(lengths, self.config.conv_kernel, self.config.conv_stride)

    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None, **options) -> ModelOutput:
        return self.forward(waveforms, lengths, **options)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None, **options) -> ModelOutput:
        """waveforms: (batch, samples) float at 16 kHz, zero-padded; lengths: (batch,) valid samples."""
        if options:  # hidden states, masking, early exit: the graph computes logits only
            raise ValueError(f"{self.path}: an ONNX model gives logits only; {', '.join(options)} needs the "
                             f"PyTorch model (the checkpoint it was exported from)")
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
        if waveforms.shape[1] < self.config.receptive_field:
            raise ValueError(f"audio of {waveforms.shape[1]} samples is shorter than one frame "
                             f"({self.config.receptive_field} samples)")
        if lengths is None:
            lengths = torch.full((waveforms.shape[0],), waveforms.shape[1])
        lengths = torch.as_tensor(lengths).long().cpu()
        if lengths.shape != (waveforms.shape[0],) or bool((lengths > waveforms.shape[1]).any()):
            raise ValueError(f"lengths must be (batch,) = ({waveforms.shape[0]},) and at most {waveforms.shape[1]}, "
                             f"got {lengths.tolist()}")
        wav = np.ascontiguousarray(waveforms.detach().float().cpu().numpy())
        logits, frames = self._session().run(list(OUTPUTS), {"waveforms": wav, "lengths": lengths.numpy()})
        logits = torch.from_numpy(logits).to(self._device)
        return ModelOutput(lengths=torch.from_numpy(frames).to(self._device), last_hidden_state=None, logits=logits)

    # ------------------------------------------------------------------ sessions
    def _session(self):
        key = (self.precision, self._device.type)
        if key not in self._sessions:
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if self._device.type == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise ValueError("--device cuda: this onnxruntime has no CUDA provider "
                                     "(install onnxruntime-gpu)")
                providers.insert(0, "CUDAExecutionProvider")
            opts = ort.SessionOptions()
            # onnxruntime reads neither OMP_NUM_THREADS nor torch's setting: the same threads as PyTorch
            opts.intra_op_num_threads = self.threads or torch.get_num_threads()
            graph = self.path if self.precision == "fp32" else self._int8_graph()
            try:
                self._sessions[key] = ort.InferenceSession(str(graph), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own classes for a bad file
                raise ValueError(f"{graph}: not a runnable ONNX graph ({type(e).__name__}: {first_line(e)})") from e
        return self._sessions[key]

    def _int8_graph(self) -> Path:
        beside = self.path.with_suffix(".int8.onnx")
        if beside.exists() and beside.stat().st_mtime >= self.path.stat().st_mtime:
            return beside
        try:
            return quantize_onnx(self.path, beside)
        except OSError:  # a read-only model folder
            self._tmp = tempfile.TemporaryDirectory()
            return quantize_onnx(self.path, Path(self._tmp.name) / beside.name)

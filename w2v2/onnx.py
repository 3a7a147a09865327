"""ONNX export and an onnxruntime-backed model that transcribes like :class:`w2v2.Wav2Vec2`.

    export_onnx(model, "out/model.onnx")          # the plain forward, traced
    model = OnnxModel("out/model.onnx", config, vocab)   # or w2v2.load_model("out")
    model(wav, lengths).logits                    # (batch, frames, vocab) float32

The graph takes ``waveforms`` (batch, samples) float32, zero-padded, and ``lengths`` (batch,)
int64 valid samples; it returns ``logits`` (batch, frames, vocab) and ``frame_lengths`` (batch,).
Batch and length axes are dynamic. It is the plain path (``w2v2.fast`` off) traced with a padded
example, so every item is normalised, group-normed and attended over its own valid samples only:
a padded item gives the logits it gives alone.

Why the TorchScript exporter: the dynamo exporter (``torch.export``) refuses the forward's
data-dependent Python branches (input checks such as "a length exceeds the padded size", and the
shortcut that skips the attention mask when nothing is padded). The tracer records the padded
path, which is the same function on unpadded input (docs/deploy.md).

int8: :func:`quantize_onnx` rewrites the graph's matrix products (``MatMul``: the Transformer's
projections and feed-forwards, the CTC head) to dynamic int8 with onnxruntime (weights per output
channel, activations per call); convolutions, norms and attention scores stay float32.
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

from . import fast
from .config import ModelConfig
from .fileio import atomic_write_bytes
from .model import ModelOutput, Wav2Vec2
from .modules import conv_output_lengths
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
        try:
            _trace(model, example, buf, opset)
        finally:
            model.train(was_training)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


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
                             weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        atomic_write_bytes(dst, out.read_bytes())
    return dst


def for_precision(model, precision: str):
    """``model`` ready to run at ``precision``: int8 runs through onnxruntime, so a PyTorch model
    is exported to a temporary graph first (``w2v2 export --onnx`` once saves that cost)."""
    if precision != "int8" or isinstance(model, OnnxModel):
        return model
    tmp = tempfile.TemporaryDirectory()
    onnx_model = OnnxModel(export_onnx(model, Path(tmp.name) / "model.onnx"), model.config, model.vocab)
    onnx_model._tmp = tmp  # removed with the model
    return onnx_model.to(model.device)


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
                 threads: int | None = None):
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
        self.precision = "int8" if precision == "int8" else "fp32"
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
            if self.threads:
                opts.intra_op_num_threads = self.threads
            graph = self.path if self.precision == "fp32" else self._int8_graph()
            try:
                self._sessions[key] = ort.InferenceSession(str(graph), opts, providers=providers)
            except Exception as e:  # onnxruntime raises its own classes for a bad file
                raise ValueError(f"{graph}: not a runnable ONNX graph ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from e
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

"""ONNX export and onnxruntime inference (w2v2/onnx.py), and int8 through it.

Parity with the plain PyTorch forward for both encoder layouts, padded batches included (each
padded item equals the item alone); identical transcripts on real speech with the embedded
default model; int8 close to fp32; bad graphs and folders rejected with one line.
"""

from __future__ import annotations

import jiwer
import numpy as np
import pytest
import torch

import w2v2
from tests.conftest import longest_clip, read_manifest
from w2v2 import config
from w2v2.audio import load_audio
from w2v2.checkpoint import CheckpointError
from w2v2.cli import main
from w2v2.commands.export import export
from w2v2.text import build_vocabulary
from w2v2.transcribe import TranscribeOptions, Transcriber, transcribe

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
CHUNKED = dict(chunk_seconds=4.0, stride_seconds=1.0)  # real clips of 5-10 s run in several chunks


def tiny_model(norm: str) -> w2v2.Wav2Vec2:
    torch.manual_seed(0)
    cfg = config.tiny(feat_extract_norm=norm, conv_bias=norm == "layer", do_stable_layer_norm=norm == "layer")
    return w2v2.build_model(cfg, vocab=build_vocabulary(["HELLO WORLD"])).eval()


@pytest.fixture(scope="module")
def default_onnx(tmp_path_factory):
    """The embedded default model exported once for the module, with its int8 graph."""
    return export("default", str(tmp_path_factory.mktemp("onnx") / "default"), onnx=True, int8=True)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_padded_batch_matches_pytorch_and_each_item_alone(norm, tmp_path):
    model = tiny_model(norm)
    w2v2.save_pretrained(model, tmp_path / "ckpt")
    out = export(str(tmp_path / "ckpt"), str(tmp_path / "onnx"), onnx=True)
    assert (out / "model.onnx").exists() and not (out / "model.safetensors").exists()
    onnx_model = w2v2.load_model(out)
    assert onnx_model.vocab == model.vocab and onnx_model.config.do_normalize == model.config.do_normalize
    torch.manual_seed(1)
    for lengths in ([23456, 20000, 9000, 400], [8000], [12345, 12345]):  # batch and length axes vary
        wav = torch.randn(len(lengths), max(lengths))
        lengths = torch.tensor(lengths)
        wav[torch.arange(wav.shape[1])[None, :] >= lengths[:, None]] = 0.0
        got = onnx_model(wav, lengths)
        with w2v2.fast.disabled(), torch.no_grad():
            ref = model(wav, lengths)
        torch.testing.assert_close(got.lengths, ref.lengths)
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-4, rtol=0)
        for i, n in enumerate(lengths.tolist()):
            with w2v2.fast.disabled(), torch.no_grad():
                alone = model(wav[i : i + 1, :n]).logits[0]
            torch.testing.assert_close(got.logits[i, : len(alone)], alone, atol=1e-4, rtol=0)


def test_onnx_file_loads_like_its_folder(tmp_path):
    model = tiny_model("group")
    out = export_tiny(model, tmp_path)
    wav = torch.randn(1, 16000)
    by_file = w2v2.load_model(out / "model.onnx")(wav).logits
    torch.testing.assert_close(by_file, w2v2.load_model(out)(wav).logits, atol=0, rtol=0)


def export_tiny(model, tmp_path):
    w2v2.save_pretrained(model, tmp_path / "ckpt")
    return export(str(tmp_path / "ckpt"), str(tmp_path / "onnx"), onnx=True)


def test_transcripts_identical_on_real_speech(default_onnx, data_dir):
    rows = read_manifest(data_dir / "ljspeech-amateur")[:4]
    paths = [str(data_dir / "ljspeech-amateur" / r["path"]) for r in rows]
    options = TranscribeOptions(precision="fp32", **CHUNKED)
    ours = Transcriber(w2v2.load_model("default"), options)
    onnx = Transcriber(w2v2.load_model(default_onnx), options)
    keyed = list(enumerate(paths))
    for (_, a), (_, b) in zip(ours.transcribe_many(keyed), onnx.transcribe_many(keyed)):
        assert isinstance(a, dict) and isinstance(b, dict), (a, b)
        assert a["text"] and a["text"] == b["text"]
        # the graph holds the inference weights only (no mask embedding, weight norm folded)
        assert a["metadata"]["model"]["parameters"] == pytest.approx(b["metadata"]["model"]["parameters"], rel=1e-3)
        times = lambda r: [(w["start"], w["end"]) for s in r["segments"] for w in s["words"]]  # noqa: E731
        assert times(a) == times(b)


def test_int8_stays_close_to_fp32_on_real_speech(default_onnx, data_dir):
    """The int8 graph keeps nearly every frame's best token, and so most characters of the fp32
    transcript (the default model's transcripts are poor, so small logit changes move a few
    characters; the dev-set CER of both is in docs/deploy.md)."""
    rows = read_manifest(data_dir / "ljspeech-amateur")[:6]
    model = w2v2.load_model(default_onnx)
    fp32, int8, agree = [], [], []
    for r in rows:
        wav = torch.from_numpy(load_audio(str(data_dir / "ljspeech-amateur" / r["path"])))[None]
        ref = model.set_precision("fp32")(wav).logits
        got = model.set_precision("int8")(wav).logits
        agree.append((ref.argmax(-1) == got.argmax(-1)).float().mean().item())
        fp32.append(transcribe(model, wav[0].numpy(), TranscribeOptions(precision="fp32"))["text"])
        int8.append(transcribe(model, wav[0].numpy(), TranscribeOptions(precision="int8"))["text"])
    assert min(agree) > 0.95
    assert fp32 != [""] * len(fp32) and jiwer.cer(fp32, int8) < 0.1
    import onnx  # the feature encoder stays float32 (int8 activations there cost too much accuracy)

    nodes = onnx.load(str(default_onnx / "model.int8.onnx")).graph.node
    assert any(n.op_type == "MatMulInteger" for n in nodes)  # the Transformer's products are int8
    encoder_products = [n.op_type for n in nodes if "/feature_extractor/" in n.name and "MatMul" in n.op_type]
    assert encoder_products and set(encoder_products) == {"MatMul"}


def test_int8_on_a_pytorch_model_runs_through_onnxruntime(data_dir):
    path, _ = longest_clip("ljspeech-amateur")
    model = w2v2.load_model("default")
    result = transcribe(model, str(path), TranscribeOptions(precision="int8", **CHUNKED))
    assert result["metadata"]["options"]["precision"] == "int8" and result["text"]
    reference = transcribe(model, str(path), TranscribeOptions(precision="fp32", **CHUNKED))["text"]
    assert jiwer.cer(reference, result["text"]) < 0.1
    model.set_precision("int8")  # the PyTorch model itself has no int8 arithmetic: a clear error
    with pytest.raises(ValueError, match="int8 runs through onnxruntime"):
        model(torch.zeros(1, 16000))


def test_cli_export_then_transcribe_int8(tmp_path, data_dir, capsys):
    path, _ = longest_clip("ljspeech-amateur")
    assert main(["export", "default", str(tmp_path / "m"), "--onnx"]) == 0
    assert main(["transcribe", str(path), "--model", str(tmp_path / "m"), "--precision", "int8",
                 "--chunk-seconds", "4", "--stride-seconds", "1"]) == 0
    assert capsys.readouterr().out.strip()
    assert (tmp_path / "m" / "model.int8.onnx").exists()  # quantized once, kept beside the graph


def test_bad_graphs_and_folders_fail_with_one_line(tmp_path, capsys):
    out = export_tiny(tiny_model("group"), tmp_path)
    (out / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(CheckpointError, match="model.onnx: not a runnable ONNX graph") as e:
        w2v2.load_model(out)
    assert "\n" not in str(e.value)
    (out / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="no vocab.json beside the ONNX graph"):
        w2v2.load_model(out)
    with pytest.raises(CheckpointError, match="missing.onnx: no such file"):
        w2v2.load_model(tmp_path / "missing.onnx")
    assert main(["export", "default", str(tmp_path / "x"), "--int8"]) == 1
    assert "--int8 needs --onnx" in capsys.readouterr().err
    torch.manual_seed(0)
    w2v2.save_pretrained(w2v2.build_model(config.tiny()), tmp_path / "pretrained")  # no CTC head
    assert main(["export", str(tmp_path / "pretrained"), str(tmp_path / "y"), "--onnx"]) == 1
    assert "needs a fine-tuned (CTC) model" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())  # nothing written there
    onnx_model = w2v2.load_model(export_tiny(tiny_model("layer"), tmp_path / "again"))
    with pytest.raises(ValueError, match="at most 16000"):
        onnx_model(torch.zeros(2, 16000), torch.tensor([16000, 16001]))
    with pytest.raises(ValueError, match="an ONNX model gives logits only; output_hidden_states needs"):
        onnx_model(torch.zeros(1, 16000), output_hidden_states=True)
    with pytest.raises(ValueError, match="shorter than one frame"):
        onnx_model(torch.zeros(1, 100))


def test_metadata_records_the_precision_that_ran(tmp_path):
    """An ONNX graph is float32 or int8: asked for bf16 or auto, it runs (and records) fp32."""
    onnx_model = w2v2.load_model(export_tiny(tiny_model("group"), tmp_path))
    wav = torch.randn(16000).numpy()
    for asked, ran in (("bf16", "fp32"), ("auto", "fp32"), ("fp32", "fp32"), ("int8", "int8")):
        assert transcribe(onnx_model, wav, TranscribeOptions(precision=asked))["metadata"]["options"]["precision"] == ran
    ours = transcribe(w2v2.load_model(tmp_path / "ckpt"), wav, TranscribeOptions(precision="bf16"))
    assert ours["metadata"]["options"]["precision"] == "bf16"  # the PyTorch model runs bf16 as asked


def test_item_without_frames_gives_finite_logits_and_leaves_the_others(tmp_path):
    """The graph's attention masks are finite (no NaN guard over the scores): an item too short for
    one frame, padded beside a long one, gives finite logits, and the long one is unchanged."""
    model = tiny_model("layer")
    onnx_model = w2v2.load_model(export_tiny(model, tmp_path))
    torch.manual_seed(2)
    wav = torch.randn(2, 16000)
    wav[1, 100:] = 0.0
    got = onnx_model(wav, torch.tensor([16000, 100]))
    assert got.lengths.tolist() == [model.num_frames(torch.tensor([16000])).item(), 0]
    assert bool(torch.isfinite(got.logits).all())
    with w2v2.fast.disabled(), torch.no_grad():
        alone = model(wav[:1]).logits
    torch.testing.assert_close(got.logits[:1], alone, atol=1e-4, rtol=0)

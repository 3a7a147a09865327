"""Chunked inference: chunk geometry, stitching against a single pass, batching, precision.

Why these tests are the right ones for stitching, with no trained model yet. A stitched
emission can equal a single pass only where every kept frame sees, inside its chunk, all
the input that the model lets it see. For a model whose frames see a bounded window, i.e.
no self-attention (0 Transformer layers), a layer-norm feature encoder (normalised per
frame, not over time like BASE's group norm) and no input normalisation (a per-utterance
mean and variance), that window is the conv receptive field plus the positional
convolution (16 frames in the tiny config), and a 1 s stride covers it: the stitched
emission must then equal the single pass frame for frame, up to float rounding. Random
weights make every frame's scores different, so any off-by-one in chunk starts, kept
ranges or frame alignment shows; a 20 ms stride, shorter than the window, must break the
equality (the test can fail). For full models (attention, group norm, normalisation) the
chunk sees less than the whole file by design, so there we check the implementation
against a naive chunk-by-chunk reference, and that agreement with the single pass grows
with the stride.
"""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import longest_clip, tiny_ctc_model
from tests.helpers import BF16_U, FP16_U, FP32_U, TF32_U, logit_error_bound, within
from w2v2 import precision as precision_module
from w2v2.audio import SAMPLE_RATE, load_audio
from w2v2.emissions import ChunkPlan, Emissions, compute_emissions, iter_chunks, plan_chunks
from w2v2.precision import precision_context, resolve_precision

LETTERS = ["abcdefghijklmnopqrstuvwxyz'"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def speech():
    """About 12 s of real speech, as 16 kHz float32 samples and as a float wav (streams bit-exactly)."""
    path, _ = longest_clip("ljspeech-amateur")
    return load_audio(path)


@pytest.fixture(scope="module")
def speech_wav(speech, tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    sf.write(path, speech, SAMPLE_RATE, subtype="FLOAT")
    return path


def single_pass(model, audio: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.from_numpy(audio)[None]).logits[0].float().log_softmax(-1)  # (frames, vocab)


def stitched(model, source, chunk_seconds, stride_seconds, batch_size=1) -> Emissions:
    plan = plan_chunks(chunk_seconds, stride_seconds, model.config)
    ((_, em),) = compute_emissions(model, [(0, source)], plan, batch_size=batch_size, keep_log_probs=True)
    assert isinstance(em, Emissions), em
    return em


# ---------------------------------------------------------------- geometry


def test_plan_rounds_to_frames_and_validates():
    plan = plan_chunks(4.0, 1.0)
    assert (plan.chunk, plan.stride, plan.step, plan.frame_stride) == (64000, 16000, 32000, 320)
    assert plan_chunks(1.001, 0.2501).chunk % 320 == 0
    assert plan_chunks(4.0, 0.0).stride == 320  # one frame: the receptive field spills into the next frame
    with pytest.raises(ValueError, match="twice stride_seconds"):
        plan_chunks(2.0, 1.0)
    assert plan.frames(399) == 0 and plan.frames(400) == 1 and plan.frames(64000) == 199


def kept_ranges(n_samples: int, block: int, plan: ChunkPlan) -> list[tuple[int, int]]:
    blocks = [np.zeros(min(block, n_samples - i), np.float32) for i in range(0, n_samples, block)]
    out = []
    for c in iter_chunks(blocks, plan):
        assert c.start % plan.frame_stride == 0
        assert len(c.audio) == plan.chunk or c.last
        f0 = c.start // plan.frame_stride
        out.append((f0 + c.keep_start, f0 + c.keep_end))
    return out


@settings(max_examples=60, deadline=None)
@given(n_samples=st.integers(0, 40_000), block=st.integers(1, 9000), chunk_frames=st.integers(5, 40),
       stride_frames=st.integers(1, 10))
def test_kept_frames_tile_the_file(n_samples, block, chunk_frames, stride_frames):
    """Kept ranges are consecutive, never overlap, and cover exactly the single-pass frames."""
    if chunk_frames <= 2 * stride_frames:
        return
    plan = ChunkPlan(chunk_frames * 320, stride_frames * 320)
    ranges = [r for r in kept_ranges(n_samples, block, plan) if r[1] > r[0]]
    covered = [f for a, b in ranges for f in range(a, b)]
    assert covered == list(range(plan.frames(n_samples)))


def test_short_audio_is_one_chunk():
    chunks = list(iter_chunks([np.ones(30_000, np.float32)], plan_chunks(4.0, 1.0)))
    assert len(chunks) == 1 and chunks[0].last and (chunks[0].keep_start, chunks[0].keep_end) == (0, 93)


# ---------------------------------------------------------------- stitched vs single pass


def test_stitched_equals_single_pass_for_a_bounded_window_model(speech, speech_wav):
    model = tiny_ctc_model(LETTERS, feat_extract_norm="layer", conv_bias=True, num_hidden_layers=0,
                           do_normalize=False)
    ref = single_pass(model, speech)
    assert len(speech) > 2 * 4 * SAMPLE_RATE  # at least three 4 s chunks
    em = stitched(model, speech_wav, chunk_seconds=4.0, stride_seconds=1.0, batch_size=2)
    assert em.frames == ref.shape[0] and em.samples == len(speech)
    assert torch.equal(em.best_ids, ref.argmax(-1))
    torch.testing.assert_close(em.best_log_prob, ref.max(-1).values, atol=1e-4, rtol=0)
    # stored as float16: one rounding (unit roundoff 2^-11) on top of the float32 agreement above
    assert ((em.log_probs() - ref).abs() <= FP16_U * ref.abs() + 1e-4).all()
    # a stride shorter than the positional convolution's reach must break the equality
    short = stitched(model, speech_wav, chunk_seconds=4.0, stride_seconds=0.02)
    assert (short.best_log_prob - ref.max(-1).values).abs().max() > 1e-2


def naive_chunks(model, audio: np.ndarray, chunk_seconds: float, stride_seconds: float) -> torch.Tensor:
    """The documented layout written out plainly: slice, run each chunk alone, drop the strides."""
    chunk, stride = int(chunk_seconds * SAMPLE_RATE), int(stride_seconds * SAMPLE_RATE)
    step = chunk - 2 * stride
    parts, start = [], 0
    while True:
        last = start + chunk >= len(audio)
        lp = single_pass(model, audio[start : start + chunk])
        parts.append(lp[(stride // 320 if start else 0) : (None if last else (chunk - stride) // 320)])
        if last:
            return torch.cat(parts)
        start += step


def test_full_model_matches_naive_chunking_with_batches(speech, speech_wav):
    model = tiny_ctc_model(LETTERS)  # attention, group-norm encoder, input normalisation
    ref = naive_chunks(model, speech, 4.0, 1.0)
    for batch_size in (1, 3):  # the short last chunk is padded in a batch of 3
        em = stitched(model, speech_wav, 4.0, 1.0, batch_size=batch_size)
        torch.testing.assert_close(em.best_log_prob, ref.max(-1).values, atol=1e-4, rtol=0)
        assert (em.best_ids == ref.argmax(-1)).float().mean() > 0.99  # near-ties of a random model may flip


def test_full_model_agreement_grows_with_stride(speech):
    model = tiny_ctc_model(LETTERS)
    ref = single_pass(model, speech)
    errors = [(stitched(model, speech, 6.0, s).log_probs() - ref).abs().mean() for s in (0.02, 1.0, 2.0)]
    assert errors[0] > errors[1] > errors[2]


def test_files_share_batches_and_results_keep_order(speech):
    model = tiny_ctc_model(LETTERS)
    plan = plan_chunks(4.0, 1.0, model.config)
    inputs = [("a", speech[:50_000]), ("bad", "/nonexistent.wav"), ("b", speech), ("tiny", speech[:100])]
    alone = {k: list(compute_emissions(model, [(k, a)], plan))[0][1] for k, a in inputs}
    together = list(compute_emissions(model, inputs, plan, batch_size=4))
    assert [k for k, _ in together] == ["a", "bad", "b", "tiny"]
    assert isinstance(dict(together)["bad"], Exception) and "nonexistent" in str(dict(together)["bad"])
    assert dict(together)["tiny"].frames == 0
    for key in ("a", "b"):
        torch.testing.assert_close(dict(together)[key].best_log_prob, alone[key].best_log_prob, atol=1e-4, rtol=0)


def test_model_errors_are_raised_not_blamed_on_an_input(speech, monkeypatch):
    model = tiny_ctc_model(LETTERS)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "forward", broken)
    plan = plan_chunks(4.0, 1.0, model.config)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(compute_emissions(model, [("a", speech), ("b", speech)], plan, batch_size=2))


# ---------------------------------------------------------------- precision


@pytest.mark.bf16
def test_precision_resolution_and_the_models_bf16_path(speech, monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision(cpu, "fp8")
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device: True)
    assert resolve_precision(cpu, "auto") == "bf16"
    monkeypatch.setattr(precision_module, "fast_bf16", lambda device: False)
    assert resolve_precision(cpu, "auto") == "fp32"

    model = tiny_ctc_model(LETTERS)
    with precision_context(model, "bf16"):
        assert model.compute_dtype == torch.bfloat16
    assert model.precision == "fp32"  # restored
    plan = plan_chunks(4.0, 1.0, model.config)
    ((_, em),) = compute_emissions(model, [(0, speech[:64000])], plan, precision="bf16")
    assert model.precision == "fp32"
    ref = single_pass(model, speech[:64000])
    assert em.frames == ref.shape[0]
    err = (em.best_log_prob - ref.max(-1).values).abs()
    # log-softmax moves by at most twice the largest logit error of its frame (tests/helpers.py)
    fp32_out = model.infer(torch.from_numpy(speech[:64000])[None])
    bound = 2 * logit_error_bound(model, fp32_out)[0].amax(-1)
    ok, ratio = within(err, bound)
    assert ok, f"bf16 log-probability error {ratio:.2f}x the bound"
    assert not within(err, 2 * logit_error_bound(model, fp32_out, u=FP32_U)[0].amax(-1))[0]  # not float32


# ---------------------------------------------------------------- GPU (skipped without one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_bf16_stays_close():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(10 * SAMPLE_RATE)).astype(np.float32)
    model = tiny_ctc_model(LETTERS)
    plan = plan_chunks(4.0, 1.0, model.config)
    ((_, cpu),) = compute_emissions(model, [(0, audio)], plan, batch_size=3)
    model.cuda()
    ((_, gpu),) = compute_emissions(model, [(0, audio)], plan, batch_size=3, device="cuda", precision="fp32")
    ((_, bf16),) = compute_emissions(model, [(0, audio)], plan, batch_size=3, device="cuda", precision="bf16")
    assert gpu.frames == bf16.frames == cpu.frames
    ref = model.cpu().infer(torch.from_numpy(audio)[None])  # the scale of the logits (tests/helpers.py)
    for em, u in ((gpu, TF32_U), (bf16, BF16_U)):  # cuDNN convolutions may use TF32 in fp32
        bound = 2 * logit_error_bound(model, ref, u=u).max()
        ok, ratio = within((em.best_log_prob - cpu.best_log_prob).abs(), bound)
        assert ok, f"error {ratio:.2f}x the bound for unit roundoff {u}"
    assert resolve_precision(torch.device("cuda"), "auto") == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")

"""bf16 on what users see: the embedded default model on real speech (ljspeech-amateur, held out
from its training), against float32. Bounds from the error model of tests/helpers.py, never from
one machine's observations; .ci/run reruns these under each ONEDNN_MAX_CPU_ISA the CPU allows."""

from __future__ import annotations

import pytest
import torch

import w2v2
from w2v2.audio import load_audio
from w2v2.checkpoint import DEFAULT_MODEL_DIR
from w2v2.decoding import greedy_decode
from w2v2.evaluate import W2v2Engine, evaluate, read_utterances, score
from w2v2.text import normalize_text
from w2v2.transcribe import TranscribeOptions, Transcriber

from .helpers import hidden_error_bound, logit_error_bound, stable_frames, within

pytestmark = [pytest.mark.bf16, pytest.mark.usefixtures("one_thread")]
HELD_OUT = "ljspeech-amateur"  # the default model's test set (its model card)
CER_POINTS = 0.2  # the promise: bf16 CER within 0.2 points (absolute, percent) of float32


def edits(a: str, b: str) -> int:
    """Character edit distance between two transcripts, normalised as CER counts them."""
    if not normalize_text(a, case=None):
        return len(normalize_text(b, case=None))
    _, cer, (row,) = score([a], [b], case=None)
    return round(cer * len(row.ref))


@pytest.fixture(scope="module")
def model():
    return w2v2.load_model(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def utterances(data_dir):
    return read_utterances(data_dir / HELD_OUT)


def test_bf16_emissions_argmax_and_transcripts_on_real_speech(model, utterances):
    """The first 6 held-out utterances (about 45 s), one at a time: the last hidden state and the
    logits within the error model's bounds; every frame whose float32 top-2 margin exceeds the
    bound keeps its argmax (so agreement >= the share of such frames); each transcript changes by
    at most 2 edits per changed frame (a frame can end one run and start another), hence the CER
    by at most 2 x changed frames / reference characters."""
    refs, hyps32, hyps16, flips, stable_n, frames = [], [], [], 0, 0, 0
    for utt in utterances[:6]:
        wav = torch.from_numpy(load_audio(utt.path))[None]
        ref = model.set_precision("fp32").infer(wav)
        out = model.set_precision("bf16").infer(wav)
        hidden_err = (out.last_hidden_state - ref.last_hidden_state).norm(dim=-1, keepdim=True)
        ok, ratio = within(hidden_err, hidden_error_bound(model.config, ref.last_hidden_state))
        assert ok, f"{utt.path}: hidden state error {ratio:.2f}x the bf16 bound"
        bound = logit_error_bound(model, ref)
        ok, ratio = within((out.logits - ref.logits).abs(), bound)
        assert ok, f"{utt.path}: logit error {ratio:.2f}x the bf16 bound"
        stable = stable_frames(ref.logits, bound)[0]
        a32, a16 = ref.logits[0].argmax(-1), out.logits[0].argmax(-1)
        assert torch.equal(a32[stable], a16[stable]), f"{utt.path}: a frame beyond the bound changed its argmax"
        flips += int((a32 != a16).sum())
        stable_n += int(stable.sum())
        frames += len(a32)
        refs.append(utt.text)
        hyps32.append(greedy_decode(ref.logits[0], model.vocab).text)
        hyps16.append(greedy_decode(out.logits[0], model.vocab).text)
        assert edits(hyps32[-1], hyps16[-1]) <= 2 * int((a32 != a16).sum()), utt.path
    assert stable_n >= 0.1 * frames  # the argmax check above is not vacuous
    _, cer32, per = score(refs, hyps32)
    _, cer16, _ = score(refs, hyps16)
    chars = sum(len(p.ref) for p in per)
    assert abs(cer16 - cer32) <= 2 * flips / chars


@pytest.mark.slow
def test_bf16_cer_within_promise_on_the_held_out_set(model, utterances):
    """The promise itself, on the whole held-out set (137 utterances, 17 min; ~15,000 characters,
    so one character is 0.007 points): bf16 CER within 0.2 points of float32, through the same
    engine as ``w2v2 evaluate``."""
    results = {}
    for precision in ("fp32", "bf16"):
        transcriber = Transcriber(model, TranscribeOptions(device="cpu", precision=precision))
        results[precision] = evaluate(W2v2Engine(transcriber), utterances)
    delta = 100 * abs(results["bf16"].cer - results["fp32"].cer)
    assert delta <= CER_POINTS, f"bf16 CER {100 * results['bf16'].cer:.2f} vs fp32 {100 * results['fp32'].cer:.2f}"

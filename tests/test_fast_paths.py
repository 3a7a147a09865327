"""The fast path (w2v2/fast: the restructured feature encoder, fused layers, oneDNN kernels, bf16)
against the plain model of w2v2/modules.py and the computations it replaces; a failed probe of a
private operator falls back to the public one. Random weights, tiny/small configs, seconds each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import w2v2
from w2v2 import fast, precision
from w2v2.config import small, tiny
from w2v2.fast import layers, onednn, training

from .conftest import hf_tiny_config
from .helpers import (
    BF16_U,
    FP32_U,
    dot_error_bound,
    hidden_error_bound,
    logit_error_bound,
    model_stages,
    network_relative_error,
    within,
)
from .test_parity import normalized, perturb, save_hf

transformers = pytest.importorskip("transformers")


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# oneDNN's AMX bf16 convolution is wrong for fewer than 16 input channels per group (public F.conv1d
# included: the plain model has no workaround, see docs/performance.md): comparisons with the plain
# model use 16 channels per group in the positional convolution, as real models do (48+).
BF16_SAFE = {"num_conv_pos_embedding_groups": 2}


@pytest.fixture
def public_ops_only(monkeypatch, recwarn):
    """Every private operator's probe fails, as if a PyTorch release had removed them all: the
    fast path runs with public operators only (and channels-first convolutions, the GPU's layout)."""
    def missing(dtype):
        raise AttributeError("no such operator")

    for name in onednn.PROBES:
        monkeypatch.setitem(onednn.PROBES, name, missing)
    onednn.probe.cache_clear()
    yield
    onednn.probe.cache_clear()


def tiny_model(norm: str, **overrides) -> w2v2.Wav2Vec2:
    torch.manual_seed(0)
    cfg = tiny(vocab_size=12, **overrides) if norm == "group" else tiny(
        vocab_size=12, feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True, **overrides)
    model = w2v2.build_model(cfg).eval()
    perturb(model)
    return model


# --------------------------------------------------------------------------- feature encoder
@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_fast_feature_encoder_equals_reference_conv_stack(norm, padded, layout, monkeypatch):
    """Group norm folded into conv 0, convs channels-last (CPU) or channels first (the layout
    other devices use), chunks in time (4 frames here, so many chunk borders), and the autograd
    path: all equal the plain layer-by-layer stack to 1e-5."""
    if layout == "channels_first":
        monkeypatch.setattr(onednn, "channels_last", lambda device: False)
    fe = tiny_model(norm).feature_extractor
    assert isinstance(fe, layers.FastFeatureEncoder)
    x = torch.randn(3, 9000)
    lengths = torch.tensor([9000, 6100, 3000]) if padded else None
    monkeypatch.setitem(fe.chunk_frames, "cpu", 4)
    with torch.no_grad():
        with fast.disabled():
            ref = fe(x, lengths)
        chunked = fe(x, lengths)
    full = fe(x, lengths)  # parameters require grad: the differentiable, unchunked path
    assert chunked.shape == ref.shape == full.shape
    assert max_diff(chunked, ref) <= 1e-5
    assert max_diff(full.detach(), ref) <= 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_folded_group_norm_with_float32_statistics(padded, monkeypatch):
    """On devices without float64 (Apple MPS) the folded group norm's statistics are float32:
    still equal to the layer-by-layer stack to 1e-4, also with a DC offset in the waveform."""
    monkeypatch.setattr(layers, "stats_dtype", lambda device: torch.float32)
    fe = tiny_model("group").feature_extractor
    x = torch.randn(2, 9000) * 0.1 + 0.5
    lengths = torch.tensor([9000, 5000]) if padded else None
    with torch.no_grad():
        with fast.disabled():
            ref = fe(x, lengths)
        folded = fe(x, lengths)
    assert max_diff(folded, ref) <= 1e-4


@pytest.mark.parametrize("kernel,stride,batch,frames", [(3, 2, 1, 40), (3, 2, 3, 41), (2, 2, 2, 37), (4, 3, 2, 50)])
def test_conv_time_train_gradients(kernel, stride, batch, frames, monkeypatch):
    """The chunked matrix-product backward of the channels-last conv (+GELU) equals autograd's."""
    monkeypatch.setattr(training.ConvTimeTrain, "chunk", 3)
    torch.manual_seed(0)
    x = torch.randn(batch, frames, 8, requires_grad=True)
    w = torch.randn(6, 8, kernel, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    ref = F.gelu(F.conv1d(x.transpose(1, 2), w, b, stride=stride)).transpose(1, 2)
    ours = training.conv_time_train(x, w, b, stride=stride, gelu=True)
    assert max_diff(ours, ref) <= 1e-5
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w, b), g)
    got = torch.autograd.grad(ours, (x, w, b), g)
    for a, r in zip(got, want):
        assert max_diff(a, r) <= 1e-5 * max(1.0, r.abs().max().item())


# --------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_inference_and_autograd_paths_agree(norm):
    """infer() (fused oneDNN ops, chunks, per-head attention) == forward with autograd on."""
    model = tiny_model(norm)
    x = torch.randn(2, 12000)
    lengths = torch.tensor([12000, 7000])
    fast = model.infer(x, lengths)
    slow = model(x, lengths)  # grad mode: the training kernels
    for i, n in enumerate(fast.lengths.tolist()):
        assert max_diff(fast.logits[i, :n], slow.logits[i, :n].detach()) <= 1e-5


def test_infer_runs_in_eval_mode_and_restores_the_mode():
    """infer() from train mode: dropout off (equal to an eval forward), train mode restored in
    every submodule; from eval mode: the model stays in eval mode."""
    torch.manual_seed(0)
    model = w2v2.build_model(tiny(vocab_size=12, hidden_dropout=0.2, attention_dropout=0.2))
    x = torch.randn(1, 8000)
    with torch.no_grad():
        assert max_diff(model.train()(x).logits, model(x).logits) > 0  # dropout is active in train mode
        want = model.eval()(x).logits
    model.train()
    assert max_diff(model.infer(x).logits, want) == 0
    assert all(m.training for m in model.modules())
    model.eval()
    assert max_diff(model.infer(x).logits, want) == 0
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("ops", ["onednn", "public"])
def test_fast_and_plain_paths_agree(norm, prec, ops, request):
    """Inference: the fast path (with oneDNN, or with every private operator's probe failed: the
    public operators and channels-first convolutions a GPU runs) equals the plain model, padded
    batch included: to float32 rounding in fp32; in bf16 both lie within the error model's logit
    bound of the float32 result (tests/helpers.py), so within twice it of each other (the plain
    path is autocast, which rounds at other places)."""
    if ops == "public":
        request.getfixturevalue("public_ops_only")
    model = tiny_model(norm, **BF16_SAFE).set_precision(prec)
    x, lengths = torch.randn(2, 9000), torch.tensor([9000, 6000])
    fast_out = model.infer(x, lengths)
    with fast.disabled():
        plain = model.infer(x, lengths)
    exact = model.set_precision("fp32").infer(x, lengths)
    bound = torch.full_like(exact.logits, 1e-5) if prec == "fp32" else logit_error_bound(model, exact)
    for i, n in enumerate(plain.lengths.tolist()):
        for name, err in (("fast", fast_out.logits - exact.logits), ("plain", plain.logits - exact.logits),
                          ("fast - plain", (fast_out.logits - plain.logits) / 2)):
            ok, ratio = within(err[i, :n].abs(), bound[i, :n])
            assert ok, f"{name}: {ratio:.2f}x the bound"


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("ops", ["onednn", "public"])
def test_fast_and_plain_gradients_agree(norm, prec, ops, request):
    """Training: every parameter gradient of a loss on the fast path (training kernels) equals the
    plain model's, to 1e-4 of the largest gradient in fp32; in bf16 within twice the error model's
    relative bound (tests/helpers.py) for a chain twice the forward's (the backward rounds as often
    again), relative to the largest gradient. Dropout off (eval mode): the fast path draws its
    masks from another random stream."""
    if ops == "public":
        request.getfixturevalue("public_ops_only")
    model = tiny_model(norm, **BF16_SAFE).set_precision(prec)
    x = torch.randn(2, 8000)

    def grads():
        model.zero_grad()
        model(x).logits.float().square().mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    got = grads()
    with fast.disabled():
        want = grads()
    assert got.keys() == want.keys() and len(got) > 20
    scale = max(g.abs().max().item() for g in want.values())
    tol = 1e-4 * scale if prec == "fp32" else 2 * network_relative_error(2 * model_stages(model.config)) * scale
    for name, g in got.items():
        assert max_diff(g, want[name]) <= tol, name


@pytest.mark.parametrize("failure", ["missing", "changed"])
def test_failed_probe_warns_once_and_falls_back(failure, monkeypatch):
    """A private operator that is missing (raises) or changed (gives another result) fails its
    probe once, with one warning naming it; the callers then run the public operator: outputs and
    gradients equal the plain model's."""
    def probe_linear(dtype):
        if failure == "missing":
            raise RuntimeError("No such operator mkldnn::_linear_pointwise")
        return False  # the probe's comparison with F.linear failed

    monkeypatch.setitem(onednn.PROBES, "linear", probe_linear)
    onednn.probe.cache_clear()
    try:
        model = tiny_model("group")
        x = torch.randn(1, 8000)
        with pytest.warns(RuntimeWarning, match="'linear'.*public operator") as caught:
            out = model(x).logits
            out.square().mean().backward()
            again = model.infer(x).logits
        assert sum("'linear'" in str(w.message) for w in caught) == 1
        with fast.disabled():
            plain = model.infer(x).logits
        assert max_diff(again, plain) <= 1e-5 and max_diff(out.detach(), plain) <= 1e-5
    finally:
        onednn.probe.cache_clear()


def test_probes_pass_on_this_torch():
    """The private operators the fast path uses exist and give the plain results with this
    PyTorch (float32; bfloat16 where oneDNN has bf16 kernels): no silent slowdown here."""
    if not onednn._platform_ready():
        pytest.skip("no oneDNN on this platform")
    for name in onednn.PROBES:
        assert onednn.PROBES[name](torch.float32), name
        if onednn.bf16_supported():
            assert onednn.PROBES[name](torch.bfloat16), name


def test_switch_off_runs_the_plain_forwards(monkeypatch):
    """W2V2_FAST=0 (read at import) and fast.set_enabled(False) are one switch: off, no fast
    forward and no oneDNN operator runs."""
    import subprocess
    import sys
    code = ("import torch, w2v2; from w2v2 import fast; from w2v2.config import tiny\n"
            "print(fast.enabled(), fast.compute_dtype(torch.zeros(1)))")
    env = {**__import__("os").environ, "W2V2_FAST": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "None"]
    model = tiny_model("group")
    called = []
    monkeypatch.setattr(onednn, "ok", lambda *a: called.append(a) or False)
    with fast.disabled():
        assert not fast.enabled()
        model.infer(torch.randn(1, 8000))
    assert fast.enabled() and called == []
    model.infer(torch.randn(1, 8000))
    assert called  # switched back on: the fast forwards ask for oneDNN again


@pytest.mark.parametrize("norm", ["group", "layer"])
@pytest.mark.parametrize("path", ["fast", "fast public ops", "plain"])
def test_gradients_match_transformers(norm, path, tmp_path, request):
    """One CTC loss, same weights: every parameter gradient equals transformers' in float32, on
    the fast path with oneDNN, with public operators only (the GPU's path), and on the plain model."""
    if path == "fast public ops":
        request.getfixturevalue("public_ops_only")
    torch.manual_seed(0)
    hf = transformers.Wav2Vec2ForCTC(hf_tiny_config(norm, mask_time_prob=0.0)).train()
    perturb(hf)
    save_hf(hf, tmp_path, vocab_size=12)
    ours = w2v2.load_model(tmp_path).train()
    x, targets = torch.randn(2, 8000), torch.randint(1, 12, (2, 5))

    def ctc(logits):
        lp = logits.log_softmax(-1).transpose(0, 1)
        return F.ctc_loss(lp, targets, torch.full((2,), logits.shape[1]), torch.full((2,), 5), reduction="sum")

    ctc(hf(normalized(x)).logits).backward()
    if path == "plain":
        with fast.disabled():
            ctc(ours(x).logits).backward()
    else:
        ctc(ours(x).logits).backward()
    ref = {k.removeprefix("wav2vec2."): p.grad for k, p in hf.named_parameters()}
    scale = max(g.abs().max().item() for g in ref.values() if g is not None)
    for name, p in ours.named_parameters():
        if name == "masked_spec_embed":  # unused without time masking, in both
            continue
        # k_proj.bias has an exactly-zero true gradient (softmax ignores a per-query constant);
        # both sides hold rounding noise there, hence the floor relative to the largest gradient
        tol = 1e-4 * max(ref[name].abs().max().item(), 1e-2 * scale)
        assert max_diff(p.grad, ref[name]) <= tol, name


# --------------------------------------------------------------------------- bf16
# Tolerances: the error model of tests/helpers.py, the same on every instruction set.
@pytest.mark.bf16
def test_bf16_logits_within_error_model():
    """bfloat16 keeps 8 significant bits: the last hidden state and the logits stay within the
    error model's bounds, yet move by more than float32 could (bf16 really ran). Argmax agreement
    is checked on the trained default model (tests/test_bf16_speech.py): a random model's top-2
    margins are all below the bound."""
    torch.manual_seed(0)
    model = w2v2.build_model(small(vocab_size=32)).eval()
    perturb(model, 0.05)
    x = torch.randn(2, 48000, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.2, 2, 48000)
    ref = model.set_precision("fp32").infer(x)
    out = model.set_precision("bf16").infer(x)
    assert out.logits.dtype == torch.float32 and out.last_hidden_state.dtype == torch.float32
    hidden_err = (out.last_hidden_state - ref.last_hidden_state).norm(dim=-1, keepdim=True)
    ok, ratio = within(hidden_err, hidden_error_bound(model.config, ref.last_hidden_state))
    assert ok, f"hidden state error {ratio:.2f}x the bf16 bound"
    err = (out.logits - ref.logits).abs()
    ok, ratio = within(err, logit_error_bound(model, ref))
    assert ok, f"logit error {ratio:.2f}x the bf16 bound"
    assert not within(err, logit_error_bound(model, ref, u=FP32_U))[0]  # computed in bf16


@pytest.mark.bf16
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_bf16_padded_batch_equals_single(norm):
    """Padding changes bf16 rounding (other shapes, other kernels) but not the result beyond the
    error model: the padded row and the row alone both stay within the bound of the float32 row."""
    model = tiny_model(norm).set_precision("bf16")
    x = torch.randn(2, 9000)
    batched = model.infer(x, torch.tensor([9000, 5000]))
    alone = model.infer(x[1:, :5000])
    ref = model.set_precision("fp32").infer(x[1:, :5000])
    f = batched.lengths[1].item()
    assert f == ref.logits.shape[1]
    bound = logit_error_bound(model, ref)[0]
    for name, logits in (("padded", batched.logits[1, :f]), ("alone", alone.logits[0])):
        ok, ratio = within((logits - ref.logits[0]).abs(), bound)
        assert ok, f"{name}: logit error {ratio:.2f}x the bf16 bound"


@pytest.mark.bf16
@pytest.mark.parametrize("cin,groups,kernel", [(8, 4, 16), (16, 16, 64), (48, 16, 128), (2, 1, 32), (14, 1, 16),
                                               (512, 1, 3)])
def test_bf16_convolution_within_rounding_bound(cin, groups, kernel):
    """The convolutions of the bf16 path against float64 on the same bf16 operands, within the
    rigorous product bound. Includes the shapes oneDNN's AMX kernel got wrong (an even number of
    input channels per group below 16, 64+ products per output: tiny's positional convolution)."""
    torch.manual_seed(0)
    c = cin * groups if cin < 512 else cin
    x = torch.randn(2, 40, c).bfloat16()  # (batch, time, channels)
    w = (torch.randn(c, cin, kernel) / (cin * kernel) ** 0.5).bfloat16()
    b = torch.randn(c).bfloat16()
    with torch.inference_mode():
        y = onednn.conv_time(x, onednn.conv_weight(w), b, padding=kernel // 2, groups=groups)
    xt = x.double().transpose(1, 2)
    ref = F.conv1d(xt, w.double(), b.double(), padding=kernel // 2, groups=groups).transpose(1, 2)
    mag = F.conv1d(xt.abs(), w.double().abs(), b.double().abs(), padding=kernel // 2, groups=groups).transpose(1, 2)
    ok, ratio = within((y.double() - ref).abs(), dot_error_bound(mag, cin * kernel + 1, ref))
    assert ok, f"convolution error {ratio:.2f}x the bound"


@pytest.mark.bf16
def test_bf16_positional_conv_gradient_within_error_model():
    """The positional convolution's weight gradient in bf16 training against float32: a backward
    pass is a second chain of as many stages, so relative to its norm the gradient stays within the
    error model's bound for twice the model's stages. Four utterances: the utterances are that
    gradient convolution's input channels per group, the shape oneDNN's AMX kernel got wrong."""
    grads = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = tiny(vocab_size=12, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                   feat_proj_dropout=0.0, final_dropout=0.0, layerdrop=0.0)
        model = w2v2.build_model(cfg).train().set_precision(prec)
        perturb(model)
        model(torch.randn(4, 16000, generator=torch.Generator().manual_seed(1))).logits.float().pow(2).mean().backward()
        grads[prec] = model.encoder.pos_conv_embed.conv.parametrizations.weight.original1.grad
    rel = ((grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()).item()
    assert rel <= network_relative_error(2 * model_stages(cfg)), rel


@pytest.mark.bf16
def test_bf16_training_step_runs_and_keeps_float32_parameters():
    model = tiny_model("group").train().set_precision("bf16")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.randn(2, 8000))
    out.logits.float().pow(2).mean().backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.float32
    assert model.state_dict().keys() == before.keys()


# --------------------------------------------------------------------------- API and caches
def test_set_precision_validates_and_resolves(monkeypatch):
    model = tiny_model("group")
    assert model.precision == "fp32" and model.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of"):
        model.set_precision("fp16")
    model.set_precision("auto")
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert model.compute_dtype == torch.float32
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    for cap, native in (("", True), ("AVX512_CORE_AMX", True), ("avx512_core_bf16", True), ("AVX512_CORE", False),
                        ("AVX2", False)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)  # oneDNN capped below bf16 emulates it: fp32 is faster
        assert model.compute_dtype == (torch.bfloat16 if native and torch.backends.mkldnn.is_available()
                                       and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32), cap


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_cached_weights_follow_parameter_updates(prec):
    """Derived weights (bf16 copies, stacked q/k/v, weight-normed pos conv) are rebuilt when a
    parameter changes in place, as an optimizer step or load_state_dict does."""
    model = tiny_model("group").set_precision(prec)
    other = tiny_model("group").set_precision(prec)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)
    x = torch.randn(1, 8000)
    model.infer(x)  # fills the caches
    model.load_state_dict(other.state_dict())
    assert max_diff(model.infer(x).logits, other.infer(x).logits) == 0.0


def test_dropout_rate_scale_and_gradient():
    x = torch.ones(500, 401, requires_grad=True)
    y = onednn.dropout(x, 0.1, True)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.9), rtol=1e-4)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert onednn.dropout(x, 0.1, False) is x


@pytest.mark.parametrize("per_head_from,flash", [(1, False), (10**9, False), (1, True)],
                         ids=["head by head", "all heads at once", "flash"])
@pytest.mark.parametrize("dtype,u", [(torch.float32, FP32_U), pytest.param(torch.bfloat16, BF16_U, marks=pytest.mark.bf16)])
def test_inference_attention_equals_sdpa(per_head_from, flash, dtype, u):
    """Against float64 on the same operands, within the rounding bound of attention (error model
    of tests/helpers.py): scores s = q.k/sqrt(d) move by at most delta = (gamma_d + 2u) |q||k|/sqrt(d)
    (products, the scale, the scores' own rounding), so each probability by a factor within
    exp(+-2 delta) and by u when rounded; the output sum_j p_j v_j adds gamma_t and its own rounding:
    |d out| <= (expm1(2 delta) + 3u + gamma_t) sum_j p_j |v_j| + u |out|."""
    torch.manual_seed(0)
    t, d = 300, 16
    q, k, v = torch.randn(2, t, 3, 4, d).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)  # (batch, heads, time, 16)
    key_mask = (torch.arange(t)[None] < torch.tensor([t, 170])[:, None])[:, None, None, :]
    qd, kd, vd = q.double(), k.double(), v.double()
    ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=key_mask)
    with torch.inference_mode():
        out = training.attention(q, k, v, key_mask, block=128, per_head_from=per_head_from, flash=flash)
    s_abs = (qd.abs() @ kd.abs().mT / d ** 0.5).masked_fill(~key_mask, 0)  # (batch, heads, time, time)
    delta = dot_error_bound(s_abs, d) + 2 * u * s_abs
    p = torch.softmax((qd @ kd.mT / d ** 0.5).masked_fill(~key_mask, float("-inf")), -1)
    gamma_t = dot_error_bound(torch.ones(()), t).item()
    bound = (torch.expm1(2 * delta.amax(-1, keepdim=True)) + 3 * u + gamma_t) * (p @ vd.abs()) + u * ref.abs()
    as_out = lambda x: x.transpose(1, 2).reshape(2, t, 64)  # noqa: E731
    ok, ratio = within((out.double() - as_out(ref)).abs(), as_out(bound))
    assert ok, f"attention error {ratio:.2f}x the bound"


@pytest.mark.parametrize("intel", [True, False])
def test_inference_attention_takes_flash_kernel_where_mkl_is_optimized(intel, monkeypatch):
    """Without autograd the flash kernel (SDPA) runs where MKL has its optimized code, the blocked
    oneDNN products elsewhere (SDPA also wherever oneDNN does not apply)."""
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(training, "mkl_optimized", lambda: intel)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    q, k, v = torch.randn(3, 1, 2, 20, 8).unbind(0)
    with torch.inference_mode():
        out = training.attention(q, k, v)
    assert len(calls) == int(intel or not onednn.ok("linear", q))
    assert max_diff(out, sdpa(q, k, v).transpose(1, 2).reshape(1, 20, 16)) < 1e-5


@pytest.mark.parametrize("padded", [False, True])
def test_training_attention_gradients_with_dropout(padded, monkeypatch):
    """AttentionTrain (head by head, dropout on the probabilities) equals the textbook formula in
    float64 with the same dropout mask, output and q/k/v gradients."""
    torch.manual_seed(0)
    b, h, t, d = 2, 3, 37, 8
    keep = torch.rand(b, h, t, t) > 0.2
    monkeypatch.setattr(training, "keep_mask", lambda shape, p, device: (keep, 1 / 0.8))
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    key_mask = (torch.arange(t)[None] < torch.tensor([t, 20])[:, None])[:, None, None, :] if padded else None
    out = training.attention(q, k, v, key_mask, dropout_p=0.2)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)

    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q2 @ k2.transpose(-1, -2) / d ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask, float("-inf"))
    ref = (torch.softmax(s, -1) * keep / 0.8) @ v2
    ref = ref.transpose(1, 2).reshape(b, t, h * d)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g.double())
    assert max_diff(out.double(), ref) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert max_diff(got.double(), want) < 1e-4 * (1 + want.abs().max().item())


@pytest.mark.parametrize("kernel,groups", [(16, 4), (7, 1), (128, 16)])
def test_grouped_conv_time_train_gradients(kernel, groups):
    """The positional convolution's backward as two forward convolutions equals conv1d's autograd."""
    torch.manual_seed(0)
    b, t, c = 2, 57, 32 if kernel < 128 else 64
    x = torch.randn(b, t, c, requires_grad=True)
    w = torch.randn(c, c // groups, kernel, requires_grad=True)
    bias = torch.randn(c, requires_grad=True)
    y = training.grouped_conv_time_train(x, w, bias, padding=kernel // 2, groups=groups)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, bias), g)
    x2, w2, b2 = (v.detach().double().requires_grad_() for v in (x, w, bias))
    ref = F.conv1d(x2.transpose(1, 2), w2, b2, padding=kernel // 2, groups=groups).transpose(1, 2)
    want = torch.autograd.grad(ref, (x2, w2, b2), g.double())
    assert max_diff(y.double(), ref) < 1e-4
    for a, e in zip(got, want):
        assert max_diff(a.double(), e) < 1e-4 * (1 + e.abs().max().item())


@pytest.mark.parametrize("batch", [1, 3])
def test_first_conv_gelu_gradients(batch, monkeypatch):
    """Conv 0 with its folded group norm (recomputing the pre-activation in chunks in the backward)
    equals gelu(u w^T + b) under autograd in float64."""
    monkeypatch.setattr(training.FirstConvTrain, "chunk", 7)  # several chunks and a partial one
    torch.manual_seed(0)
    u = torch.randn(batch, 40, 10)
    w = torch.randn(batch, 16, 10, requires_grad=True)
    b = torch.randn(batch, 16, requires_grad=True)
    h = training.first_conv_gelu(u, w, b)
    g = torch.randn_like(h)
    got = torch.autograd.grad(h, (w, b), g)
    w2, b2 = (x.detach().double().requires_grad_() for x in (w, b))
    ref = F.gelu(torch.baddbmm(b2[:, None, :], u.double(), w2.mT))
    want = torch.autograd.grad(ref, (w2, b2), g.double())
    assert max_diff(h.double(), ref) < 1e-5
    for a, e in zip(got, want):
        assert max_diff(a.double(), e) < 1e-4 * (1 + e.abs().max().item())


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_torch_compile_traces_one_graph(norm):
    """Under ``torch.compile`` the model runs its plain forwards (no oneDNN calls, derived-weight
    cache or host sync): inference and a training forward trace as one graph each, equal to eager."""
    model = tiny_model(norm)
    x = torch.randn(2, 6000)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    with torch.inference_mode():
        assert max_diff(compiled(x).logits, model(x).logits) < 1e-5
    model.train()
    loss = compiled(x).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    torch._dynamo.reset()


def test_onednn_kernels_only_on_x86():
    """oneDNN kernels and channels-last convolutions where they were measured (x86), PyTorch's own
    ops on ARM CPUs; channels-last only where oneDNN's convolution passed its probe."""
    assert onednn.onednn_platform("x86_64") and onednn.onednn_platform("AMD64")
    assert not onednn.onednn_platform("arm64") and not onednn.onednn_platform("aarch64")
    assert onednn.channels_last(torch.device("cpu")) == (onednn._platform_ready() and onednn.probe("conv"))
    assert not onednn.channels_last(torch.device("meta"))

"""The shared training engine: schedules, exact resumption, NaN safety, checkpoints, DDP gradients."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
import torch.multiprocessing as mp

import w2v2
from w2v2 import data
from w2v2.config import tiny
from w2v2.modules import lengths_to_mask
from w2v2.runs import LOCK_FILE, checkpoint_name, checkpoint_step
from w2v2.trainer import (STATE_FILE, TrainConfig, Trainer, checkpoint_dirs, get_lr, last_checkpoint,
                          read_metrics)

from .helpers import write_clips


# ---------------------------------------------------------------------------- helpers
def frame_loss(model, batch):
    """A deterministic loss for engine tests: mean square of the context, summed over valid frames."""
    out = model(batch["waveforms"], batch["lengths"])
    valid = lengths_to_mask(out.lengths, out.last_hidden_state.shape[1])
    per_frame = out.last_hidden_state.float().pow(2).mean(-1)  # (batch, frames)
    loss = (per_frame * valid).sum()
    if batch.get("poison"):
        loss = loss * float("nan")
    n = int(valid.sum())
    return loss, n, {"mean_square": float(loss.detach()) / n}


def clips(tmp_path, n=6):
    folder = tmp_path / "clips"
    write_clips(folder, [0.4 + 0.1 * i for i in range(n)])
    return data.list_entries([folder])


def factory(entries, max_tokens=20_000, crop=True, seed=0):
    ds = data.AudioDataset(entries, max_samples=16_000, seed=seed)
    sampler = data.BucketBatchSampler([ds.num_samples(i) for i in range(len(ds))], max_tokens, seed=seed,
                                      crop_to_shortest=crop)
    return data.make_loader_factory(ds, sampler, data.Collate(crop_to_shortest=crop, seed=seed))


def config(**kw):
    base = dict(lr=1e-3, warmup_updates=2, max_updates=6, save_interval=100, keep_last=2, progress=False,
                seed=3, device="cpu", log_interval=1)
    base.update(kw)
    return TrainConfig(**base)


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return w2v2.build_model(tiny(**{"hidden_dropout": 0.1, **kw}))


# ---------------------------------------------------------------------------- schedules
def test_polynomial_schedule():
    cfg = TrainConfig(lr=1.0, warmup_updates=4, max_updates=12)
    lrs = [get_lr(s, cfg) for s in range(13)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[8] == 0.5 and lrs[12] == 0.0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_tri_stage_schedule():
    cfg = TrainConfig(lr=1.0, schedule="tri_stage", max_updates=100, tri_stage_ratios=(0.1, 0.4, 0.5))
    assert get_lr(0, cfg) == pytest.approx(0.01)
    assert get_lr(10, cfg) == get_lr(49, cfg) == 1.0
    assert get_lr(75, cfg) == pytest.approx(math.sqrt(0.05))
    assert get_lr(100, cfg) == get_lr(500, cfg) == pytest.approx(0.05)


def test_config_round_trip_and_errors():
    cfg = TrainConfig(lr=2e-4, precision="bf16")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"learning_rate": 1})


# ---------------------------------------------------------------------------- resumption
def test_time_clock_schedule_spreads_over_the_budget_and_survives_resume(tmp_path, monkeypatch):
    """--schedule-clock time: the learning rate follows the fraction of max_minutes spent (resumes
    included), and training stops when the budget is spent, whatever max_updates says."""
    import w2v2.trainer as trainer_mod

    now = [1000.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])

    def tick(trainer, row):  # every update takes 6 "seconds": 10 updates per minute
        now[0] += 6.0

    cfg = config(schedule="polynomial", warmup_updates=0, max_updates=1000, max_minutes=1.0,
                 schedule_clock="time", save_interval=4)
    entries = clips(tmp_path)

    def interrupt(trainer, row):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    first = Trainer(model(), frame_loss, factory(entries), cfg, run, hooks=[tick, interrupt]).train()
    assert first["step"] == 4 and first["stopped_early"]
    now[0] += 3600.0  # time between the two invocations does not count
    second = Trainer(model(), frame_loss, factory(entries), cfg, run, hooks=[tick]).train(resume=True)
    assert second["step"] == 10  # 60 s of training in all, at 6 s per update
    lrs = [r["lr"] for r in read_metrics(run)]
    expected = [get_lr(int(0.1 * i * 1000), cfg) for i in range(10)]  # fraction i/10 of the budget spent
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="max_minutes"):
        config(schedule_clock="time")


def test_progress_follows_the_budget_that_stops_the_run(tmp_path, monkeypatch):
    """With a time budget the bar counts to the update the clock will stop the run at (projected
    from the pace so far), not to max_updates: --schedule-clock time --max-minutes 1.5 once
    showed 13000 updates and a 17-hour ETA for a run of 90 seconds. Pretraining and
    fine-tuning share this trainer."""
    import w2v2.trainer as trainer_mod

    now = [1000.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])

    def slow_loss(m, batch):  # every update takes 6 "seconds": 15 fit in 1.5 minutes
        now[0] += 6.0
        return frame_loss(m, batch)

    seen = []
    entries = clips(tmp_path)
    for clock, minutes, expected in (("time", 1.5, 15), ("updates", 1.5, 15), ("updates", None, 20)):
        seen.clear()
        cfg = config(max_updates=20 if minutes is None else 13000, max_minutes=minutes, schedule_clock=clock,
                     progress=True, save_interval=1000)
        trainer = Trainer(model(), slow_loss, factory(entries), cfg, tmp_path / f"{clock}{minutes}",
                          hooks=[lambda t, row: seen.append((t._bar.n, t._bar.total))])
        assert trainer.train()["step"] == expected
        assert seen == [(n, expected) for n in range(1, expected + 1)], (clock, minutes, seen)
    seen.clear()
    cfg = config(max_updates=13000, max_epochs=2, progress=True, save_interval=1000)
    steps = Trainer(model(), frame_loss, factory(entries), cfg, tmp_path / "epochs",
                    hooks=[lambda t, row: seen.append((t._bar.n, t._bar.total))]).train()["step"]
    assert 2 < steps < 100 and seen == [(n, steps) for n in range(1, steps + 1)], seen  # two epochs


def test_resume_is_exact(tmp_path):
    """6 updates straight == 3, interrupted by SIGINT, + resume + 3: identical weights."""
    entries = clips(tmp_path)
    straight = model()
    Trainer(straight, frame_loss, factory(entries), config(), tmp_path / "a").train()

    def interrupt(trainer, row):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    first = model()
    result = Trainer(first, frame_loss, factory(entries), config(), tmp_path / "b", hooks=[interrupt]).train()
    assert result["stopped_early"] and result["step"] == 3
    assert last_checkpoint(tmp_path / "b").name == "checkpoint_0000003"
    resumed = model(seed=99)  # different init: everything must come from the checkpoint
    result = Trainer(resumed, frame_loss, factory(entries), config(), tmp_path / "b").train(resume=True)
    assert result["step"] == 6 and not result["stopped_early"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows_a, rows_b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["update"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert (tmp_path / "b" / "metrics.csv").read_text().count("\n") == 7  # header + 6 rows


def test_a_bad_file_reached_mid_epoch_is_skipped_counted_and_resume_stays_exact(tmp_path, caplog):
    """Checked when read (a large manifest's files are not probed up front): the broken file is
    logged and replaced, the metrics count it, training goes on, and a resumed run still equals
    an uninterrupted one, counts included."""
    entries = clips(tmp_path)
    table, bad = data.check_entries(entries, upfront_limit=0)
    broken = table.path(2)
    with open(broken, "wb") as f:
        f.write(b"no longer audio")
    assert len(table) == 6 and not bad
    straight = model()
    summary = Trainer(straight, frame_loss, factory(table), config(), tmp_path / "a").train()
    assert f"skipping unreadable audio (using the next entry instead): {broken}: not an audio file" in caplog.text
    rows_a = read_metrics(tmp_path / "a")
    assert summary["skipped_files"] == sum(r["skipped_files"] for r in rows_a) >= 2  # read in each epoch

    def interrupt(trainer, row):
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    Trainer(model(), frame_loss, factory(table), config(), tmp_path / "b", hooks=[interrupt]).train()
    resumed = model(seed=99)
    result = Trainer(resumed, frame_loss, factory(table), config(), tmp_path / "b").train(resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    rows_b = read_metrics(tmp_path / "b")
    assert [(r["loss"], r["skipped_files"]) for r in rows_a] == [(r["loss"], r["skipped_files"]) for r in rows_b]
    assert result["skipped_files"] == summary["skipped_files"]


def test_resume_with_changed_options_says_which(tmp_path, caplog):
    """Options that change the course of training (learning rate, schedule length, seed, ...) may
    change on resume, with a warning naming them; bookkeeping options (keep_last, ...) silently."""
    import logging

    entries = clips(tmp_path)
    Trainer(model(), frame_loss, factory(entries), config(max_updates=2), tmp_path / "run").train()
    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        Trainer(model(), frame_loss, factory(entries), config(max_updates=2, keep_last=5, log_interval=7),
                tmp_path / "run").train(resume=True)
        assert "options" not in caplog.text
        Trainer(model(), frame_loss, factory(entries), config(max_updates=4, lr=2e-3, betas=(0.9, 0.99)),
                tmp_path / "run").train(resume=True)
    warning = caplog.text.strip().splitlines()[-1]
    assert "resuming checkpoint_0000002 with other training options" in warning
    assert "lr 0.001 -> 0.002" in warning and "max_updates 2 -> 4" in warning and "betas" in warning
    assert "keep_last" not in warning and "log_interval" not in warning


def test_checkpoints_layout_and_keep_last(tmp_path):
    entries = clips(tmp_path)
    m = model()
    Trainer(m, frame_loss, factory(entries), config(save_interval=2, keep_last=2), tmp_path / "run").train()
    names = [p.name for p in checkpoint_dirs(tmp_path / "run")]
    assert names == ["checkpoint_0000004", "checkpoint_0000006"]
    last = tmp_path / "run" / "checkpoint_last"
    assert last.is_symlink() and last.resolve().name == "checkpoint_0000006"
    loaded = w2v2.load_model(last)  # a Hugging Face-layout model directory
    for (name, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    state = torch.load(last / STATE_FILE, weights_only=True)
    assert state["step"] == 6 and "optimizer" in state and "rng" in state
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")] == [LOCK_FILE]  # no temporaries


def test_checkpoint_names_order_by_update_number_everywhere(tmp_path):
    """One naming rule, numeric order: past 9999999 updates a name has 8 digits and sorts before
    shorter ones as text; the run, its checkpoint_last fallback and load_model's choice of the
    newest checkpoint all go by the number."""
    from w2v2.checkpoint import _run_dir_model

    assert checkpoint_name(100) == "checkpoint_0000100" and checkpoint_step("checkpoint_0000100") == 100
    assert checkpoint_step("checkpoint_10000000") == 10_000_000
    for other in ("checkpoint_last", "checkpoint_12.corrupt", "checkpoint_²", "checkpoint_", "best"):
        assert checkpoint_step(other) is None, other
    run = tmp_path / "run"
    for step in (9_999_999, 10_000_000, 5):
        (run / checkpoint_name(step)).mkdir(parents=True)
        (run / checkpoint_name(step) / "config.json").write_text("{}")
    (run / "checkpoint_²").mkdir()  # a digit to str.isdigit, not to int()
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint_0000005", "checkpoint_9999999",
                                                      "checkpoint_10000000"]
    assert last_checkpoint(run) == run / "checkpoint_10000000"
    assert _run_dir_model(run) == run / "checkpoint_10000000"


def test_the_effective_batch_is_logged(tmp_path, caplog):
    """At the start the most audio an update can hold (max_tokens x accum_steps x processes), after
    the first update the audio it held, as metrics.jsonl records it."""
    import logging

    entries = clips(tmp_path)
    with caplog.at_level(logging.INFO, logger="w2v2.trainer"):
        Trainer(model(), frame_loss, factory(entries), config(max_updates=2, accum_steps=3), tmp_path / "run",
                batch_samples=20_000).train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("effective batch")]
    bound = 20_000 * 3 / 16000 / 3600
    assert lines[0].startswith(f"effective batch: {bound:.3g} hours of audio per update at most (20000 samples x 3 ")
    first = read_metrics(tmp_path / "run")[0]
    assert lines[1].startswith(f"effective batch: {first['audio_seconds'] / 3600:.3g} hours of audio per update "
                               "(measured at update 1")
    assert 0 < first["audio_seconds"] <= 20_000 * 3 / 16000 and len(lines) == 2


# ---------------------------------------------------------------------------- non-finite safety
def test_nan_batch_is_skipped_without_touching_weights(tmp_path):
    entries = clips(tmp_path)
    inner = factory(entries)
    calls = {"n": 0}

    def poisoned(epoch, skip):
        for batch in inner(epoch, skip):
            calls["n"] += 1
            if calls["n"] == 3:
                batch["poison"] = True
            yield batch

    m = model()
    snapshots = []
    trainer = Trainer(m, frame_loss, poisoned, config(max_updates=4), tmp_path / "run",
                      hooks=[lambda t, row: snapshots.append((row, {k: v.clone() for k, v in m.state_dict().items()}))])
    trainer.train()
    rows = [r for r, _ in snapshots]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 0, 0]
    assert [r["update"] for r in rows] == [1, 2, 2, 3, 4]
    before, after = snapshots[1][1], snapshots[2][1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in m.state_dict().values())
    assert trainer.skipped == 1
    assert [r["skipped"] for r in read_metrics(tmp_path / "run")] == [0, 0, 1, 0, 0]


# ---------------------------------------------------------------------------- gradients: accumulation and DDP
def _batch(entries, idx):
    ds = data.AudioDataset(entries, max_samples=None)
    return data.Collate()([ds[i] for i in idx])


def _grads(trainer, batches):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.forward_backward(batches)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    entries = clips(tmp_path, 4)
    trainer = Trainer(model(hidden_dropout=0.0), frame_loss, None, config(), tmp_path / "run")
    whole = _grads(trainer, [_batch(entries, [0, 1, 2, 3])])
    parts = _grads(trainer, [_batch(entries, [0]), _batch(entries, [1, 2, 3])])
    for name in whole:
        assert torch.allclose(whole[name], parts[name], atol=1e-6, rtol=1e-5), name


# The same per-frame terms summed in another grouping (per rank, then across ranks) differ by a few
# fp32 rounding errors of the larger partial sums: atol 1e-5 on gradients of order 1e-2..1, rtol 1e-4.
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
# Adam's first update is lr * g / (|g| + eps): an error in g moves the weights by at most lr / eps
# times as much. This test's eps (1e-2, not 1e-6) keeps that factor small (0.05 at the first lr).
ONE_STEP = dict(eps=1e-2, weight_decay=0.0)


def _weight_tolerance(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on two first updates' difference from GRAD_TOL, plus weight rounding."""
    cfg = config(**ONE_STEP)
    return (get_lr(0, cfg) / cfg.eps * (GRAD_TOL["atol"] + GRAD_TOL["rtol"] * grad.abs())
            + 4 * torch.finfo(torch.float32).eps * weight.abs())


def projection_loss(model, batch):
    """A deterministic loss whose gradient reaches every weight: the context projected on a fixed
    direction, summed over valid frames (the mean square of a layer-normed output reaches only the
    last norm's weights)."""
    out = model(batch["waveforms"], batch["lengths"])
    hidden = out.last_hidden_state.float()
    direction = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0))
    valid = lengths_to_mask(out.lengths, hidden.shape[1])
    loss = ((hidden @ direction) * valid).sum()
    return loss, int(valid.sum()), {}


def _one_update(trainer, batch):
    trainer.make_loader = lambda epoch, skip: [batch]
    trainer.optimizer.zero_grad(set_to_none=True)  # _grads left its gradients there
    trainer.train_step()


def _two_process_worker(rank, world, rendezvous, entries, tmp_path):
    """A run directory of each rank's own (refused); DDP, then FSDP: gradients and one update of
    this rank's half, a checkpoint each; an FSDP trainer resumes the single-process checkpoint
    and saves it again."""
    from torch.distributed.tensor import DTensor

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # a file rendezvous: a TCP port picked free can be taken before the ranks bind it
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        Trainer(model(), frame_loss, None, config(), tmp_path / f"node{rank}")  # each "machine" its own disk
    except ValueError as e:
        (tmp_path / f"local_dir_error.{rank}").write_text(str(e))
    # unequal halves: 1 and 3 utterances of different lengths, so the sample sizes differ per rank
    batch = _batch(entries, [0] if rank == 0 else [1, 2, 3])
    for mode in ("ddp", "fsdp"):
        trainer = Trainer(model(hidden_dropout=0.0), projection_loss, None,
                          config(find_unused_parameters=True, fsdp=mode == "fsdp", **ONE_STEP), tmp_path / mode)
        grads = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in _grads(trainer, [batch]).items()}
        assert trainer.sharded == (mode == "fsdp")
        if trainer.sharded:  # really sharded: each rank holds about half of every large parameter
            w = trainer.model.encoder.layers[0].feed_forward.intermediate_dense.weight
            assert isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // world
        torch.save(grads, tmp_path / f"{mode}.grads.{rank}")
        _one_update(trainer, batch)
        trainer.save_checkpoint()
        trainer._lock.release()
    for mode in ("ddp", "fsdp"):  # layerdrop: every rank skips the same layers (FSDP units), one process too
        trainer = Trainer(model(hidden_dropout=0.0, layerdrop=0.5), projection_loss, None,
                          config(find_unused_parameters=True, fsdp=mode == "fsdp"), tmp_path / f"{mode}_layerdrop")
        grads = {n: p.full_tensor() if isinstance(p, DTensor) else p for n, p in _grads(trainer, [batch]).items()}
        torch.save(grads, tmp_path / f"{mode}_layerdrop.grads.{rank}")
        trainer._lock.release()
    trainer = Trainer(model(seed=7), projection_loss, None, config(fsdp=True, **ONE_STEP), tmp_path / "fsdp_resumed")
    trainer.load_checkpoint(tmp_path / "one" / "checkpoint_0000001")
    trainer.save_checkpoint()
    torch.distributed.destroy_process_group()


def _checkpoint(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors"), torch.load(path / STATE_FILE, weights_only=True)


def _assert_close_state(a, b, **tol):
    """Two trainer states: the same keys, and equal (torch.equal without ``tol``) tensors."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_close_state(a[key], b[key], **tol)
        elif isinstance(a[key], torch.Tensor):
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            assert torch.allclose(a[key], b[key], **tol) if tol else torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One process trains one update on a batch, then two (gloo, CPU) do the same with half each,
    under DDP and under FSDP; one process spawn serves every test below (seconds each)."""
    tmp_path = tmp_path_factory.mktemp("two_processes")
    entries = clips(tmp_path, 4)
    single = Trainer(model(hidden_dropout=0.0), projection_loss, None, config(**ONE_STEP), tmp_path / "one")
    whole = _batch(entries, [0, 1, 2, 3])
    expected = _grads(single, [whole])
    before = {k: v.detach().clone() for k, v in single.model.named_parameters()}
    _one_update(single, whole)
    after = {k: v.detach().clone() for k, v in single.model.named_parameters()}
    single.save_checkpoint()
    single._lock.release()
    dropping = Trainer(model(hidden_dropout=0.0, layerdrop=0.5), projection_loss, None, config(),
                       tmp_path / "one_layerdrop")
    torch.save(_grads(dropping, [whole]), tmp_path / "one_layerdrop.grads")
    dropping._lock.release()
    mp.spawn(_two_process_worker, args=(2, tmp_path / "rendezvous", entries, tmp_path), nprocs=2, join=True)
    return tmp_path, expected, before, after


def test_ddp_and_fsdp_gradients_updates_and_checkpoints_equal_single_process(two_processes):
    """2 gloo processes on the CPU, each half of a batch: under DDP and FSDP2 (--fsdp) the gradients
    and the first update equal one process's on the whole batch (within fp32 summation-order
    tolerances), the checkpoints are the same files with the same keys, shapes and values, and an
    FSDP trainer resumes a single-process checkpoint exactly (saving it back bit-identical)."""
    tmp_path, expected, before, after = two_processes
    moved = [k for k in expected
             if ((after[k] - before[k]).abs() > 10 * _weight_tolerance(expected[k], before[k])).any()]
    assert len(moved) > len(expected) // 2, "the update moved few weights: the comparisons below would prove little"
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            got = torch.load(tmp_path / f"{mode}.grads.{rank}", weights_only=True)
            assert set(got) == set(expected)
            for name in expected:
                assert torch.allclose(got[name], expected[name], **GRAD_TOL), (mode, rank, name)
    ref_weights, ref_state = _checkpoint(tmp_path / "one" / "checkpoint_0000001")
    for mode in ("ddp", "fsdp"):
        weights, state = _checkpoint(tmp_path / mode / "checkpoint_0000001")
        assert weights.keys() == ref_weights.keys()
        loaded = dict(w2v2.load_model(tmp_path / mode / "checkpoint_0000001").named_parameters())  # a model dir
        for k in expected:
            assert ((loaded[k] - after[k]).abs() <= _weight_tolerance(expected[k], after[k])).all(), (mode, k)
        _assert_close_state(state["optimizer"]["state"], ref_state["optimizer"]["state"], **GRAD_TOL)
        assert state["optimizer"]["param_groups"] == ref_state["optimizer"]["param_groups"]
        assert len(state["rank_rng"]) == 2 and state["world_size"] == 2
    resumed_weights, resumed_state = _checkpoint(tmp_path / "fsdp_resumed" / "checkpoint_0000001")
    _assert_close_state(resumed_weights, ref_weights)
    _assert_close_state(resumed_state["optimizer"], ref_state["optimizer"])


def test_a_run_directory_that_not_every_rank_sees_is_an_error_on_every_rank(two_processes):
    """--out on a node-local disk: each machine would have its own run directory, and a resume
    (every rank reads the checkpoint; rank 0 may be on another node after a restart) would fail
    or diverge. Refused at the start, on every rank, with one line naming the directory."""
    tmp_path = two_processes[0]
    for rank in range(2):
        message = (tmp_path / f"local_dir_error.{rank}").read_text()
        assert "not the same directory on every node" in message and f"node{rank}:" in message, message


def test_layerdrop_skips_the_same_layers_on_every_rank_under_ddp_and_fsdp(two_processes):
    """Layerdrop draws from (seed, update, micro-batch), not from each rank's generator: FSDP needs
    every rank to run or skip a layer (a unit) together, and two processes then compute the
    gradient one process does, skipped layers included."""
    tmp_path = two_processes[0]
    expected = torch.load(tmp_path / "one_layerdrop.grads", weights_only=True)
    layers = {name.split(".")[2] for name in expected if name.startswith("encoder.layers.")}
    assert 0 < len(layers) < len(model(layerdrop=0.5).encoder.layers), "no layer skipped, or all: proves nothing"
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            got = torch.load(tmp_path / f"{mode}_layerdrop.grads.{rank}", weights_only=True)
            assert set(got) == set(expected), (mode, rank)
            for name in expected:
                assert torch.allclose(got[name], expected[name], **GRAD_TOL), (mode, rank, name)


def test_resuming_with_another_number_of_processes_rescales_the_position_and_says_so(two_processes, caplog):
    """A checkpoint of 2 processes resumed by 1: this rank's position in the epoch covers the
    batches both ranks had taken, and a warning says the run leaves the uninterrupted course."""
    import logging

    tmp_path = two_processes[0]
    trainer = Trainer(model(hidden_dropout=0.0), projection_loss, None, config(**ONE_STEP), tmp_path / "one_of_two")
    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        trainer.load_checkpoint(tmp_path / "ddp" / "checkpoint_0000001")
    assert trainer.step == 1 and trainer.batches_in_epoch == 2  # 1 batch on each of 2 ranks
    assert "saved by 2 processes and resumes with 1" in caplog.text


"""Interrupted work loses nothing: kill -9 during pretraining, crashes inside a save, damaged
checkpoint files, non-finite batches, and safe loading (safetensors; pickles only weights_only).

The reference for exactness is an uninterrupted run: after any number of kills and resumes the
final weights and optimizer state must be bit-identical to it (``torch.equal``).
"""

from __future__ import annotations

import ast
import contextlib
import errno
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from w2v2 import data
from w2v2.checkpoint import CheckpointError
from w2v2.cli import main
from w2v2.runs import LOCK_FILE, RunError, RunLock
from w2v2.trainer import STATE_FILE, Trainer, checkpoint_dirs, last_checkpoint, read_checkpoint, read_metrics

from .helpers import write_clips
from .test_trainer import clips, config, factory, frame_loss, model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
UPDATES = 10
PRETRAIN = ["--preset", "tiny", "--no-progress", "--max-tokens", "24000", "--max-updates", str(UPDATES),
            "--save-interval", "1", "--keep-last", "2", "--seed", "5"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    write_clips(folder, [0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    return folder / "audio"


@pytest.fixture(scope="module")
def reference(audio, tmp_path_factory):
    """An uninterrupted tiny pretraining run (in this process, one thread, as the subprocesses)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        assert main(["pretrain", str(audio), "--out", str(run), *PRETRAIN]) == 0
    finally:
        torch.set_num_threads(before)
    return run, time.perf_counter() - start


def pretrain_process(audio, run: Path, resume: bool, inject: str = "") -> subprocess.Popen:
    """``w2v2 pretrain`` in a child process; ``inject`` is Python run first (to plant a crash)."""
    argv = ["pretrain", str(audio), "--out", str(run), *PRETRAIN, *(["--resume"] if resume else [])]
    code = f"{inject}\nimport sys\nfrom w2v2.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def resume_to_the_end(audio, run: Path) -> None:
    assert main(["pretrain", str(audio), "--out", str(run), *PRETRAIN, "--resume"]) == 0


def assert_intact(run: Path) -> None:
    """Every visible checkpoint verifies (checksums, trainer state, weights); checkpoint_last is one of them."""
    found = checkpoint_dirs(run)
    assert found, "no checkpoint"
    for ckpt in found:
        read_checkpoint(ckpt, torch.nn.Module())  # not a Wav2Vec2: reads model.safetensors as is
    assert last_checkpoint(run) in found


def assert_same_as_reference(run: Path, reference: Path) -> None:
    mine, theirs = run / "checkpoint_last", reference / "checkpoint_last"
    assert mine.resolve().name == theirs.resolve().name == f"checkpoint_{UPDATES:07d}"
    a, b = load_file(mine / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = torch.load(mine / STATE_FILE, weights_only=True)["optimizer"]["state"]
    sb = torch.load(theirs / STATE_FILE, weights_only=True)["optimizer"]["state"]
    for i in sb:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    rows, ref_rows = read_metrics(run), read_metrics(reference)
    assert [r["update"] for r in rows] == list(range(1, UPDATES + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]  # no temporaries


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_cleanly(audio, tmp_path):
    """A scheduler's `kill -TERM -PGID` reaches the DataLoader workers too: they must keep serving
    so that the trainer finishes its update, saves and exits 0 (it once died with "DataLoader
    worker killed by signal: Terminated")."""
    run = tmp_path / "run"
    argv = ["pretrain", str(audio), "--out", str(run), *PRETRAIN, "--max-updates", "100000", "--num-workers", "2"]
    code = f"import sys\nfrom w2v2.cli import main\nsys.exit(main({argv!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert "Terminated" not in err and "error" not in err.lower(), err
    assert_intact(run)
    assert last_checkpoint(run).name == f"checkpoint_{len(read_metrics(run)):07d}"


# ---------------------------------------------------------------------------- kill -9
def test_kill_9_at_a_random_moment_then_resume_is_exact(audio, reference, tmp_path):
    """Killed (SIGKILL) once a checkpoint exists, at a random time (a checkpoint is saved after
    every update, so the kill often lands inside a save); resumed twice: the same weights."""
    ref_run, ref_seconds = reference
    seed = int(os.environ.get("W2V2_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    run = tmp_path / "run"
    for attempt in range(2):
        proc = pretrain_process(audio, run, resume=attempt > 0)
        start = len(checkpoint_dirs(run)) and max(int(p.name[11:]) for p in checkpoint_dirs(run))
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:  # wait for a new checkpoint
            done = checkpoint_dirs(run)
            if done and int(done[-1].name[11:]) > start:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.6 * ref_seconds))
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode in (-signal.SIGKILL, 0), (seed, err)
        assert "Traceback" not in err, (seed, err)
        assert_intact(run)
    resume_to_the_end(audio, run)
    assert_same_as_reference(run, ref_run)


CRASHES = {
    # after the weights and trainer state are written to the temporary directory, before the rename
    "inside_save": ("write_checksums", "def crash(*a, **k):\n    os._exit(137)"),
    # the new checkpoint is in place, checkpoint_last still points to the one before
    "before_repointing_last": ("_point_last", "def crash(*a, **k):\n    os._exit(137)"),
    # an old checkpoint was renamed for deletion and only partly deleted
    "while_deleting_old": ("_remove_dir", "def crash(d):\n    doomed = d.with_name('.' + d.name + '.deleting-1')\n"
                                          "    os.replace(d, doomed)\n    os.remove(doomed / 'config.json')\n"
                                          "    os._exit(137)"),
    # half of the trainer state written into the temporary directory
    "while_writing_the_state": ("torch.save", "def crash(obj, f):\n    f.write(b'half a state')\n    os._exit(137)"),
    # the new checkpoint_last link made under its temporary name, not yet renamed over the old one
    "inside_repointing_last": ("os.symlink", "def crash(src, dst):\n    _real(src, dst)\n    os._exit(137)"),
}


@pytest.mark.parametrize("where", [pytest.param("inside_save"),
                                   pytest.param("before_repointing_last", marks=pytest.mark.slow),
                                   pytest.param("while_deleting_old", marks=pytest.mark.slow),
                                   pytest.param("while_writing_the_state", marks=pytest.mark.slow),
                                   pytest.param("inside_repointing_last", marks=pytest.mark.slow)])
def test_crash_at_each_step_of_a_save_then_resume_is_exact(where, audio, reference, tmp_path):
    name, body = CRASHES[where]
    calls = 3 if name != "_remove_dir" else 1  # the third save (the first deletion) crashes
    target = name if "." in name else f"t.{name}"
    inject = (f"import os\nimport torch\nimport w2v2.runs as t\n_real, _n = {target}, [0]\n{body}\n"
              f"def patched(*a, **k):\n    _n[0] += 1\n    return crash(*a, **k) if _n[0] == {calls} else _real(*a, **k)\n"
              f"{target} = patched")
    proc = pretrain_process(audio, tmp_path / "run", resume=False, inject=inject)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 137, err
    assert_intact(tmp_path / "run")
    resume_to_the_end(audio, tmp_path / "run")
    assert_same_as_reference(tmp_path / "run", reference[0])


# ---------------------------------------------------------------------------- damaged checkpoints
def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "flip":  # one bit in the middle: tensor data, which neither format checks itself
        i = len(raw) // 2
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:])
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * 10)
    elif how == "fifo":  # reading it would wait for a writer forever
        path.unlink()
        os.mkfifo(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-update run with checkpoints at 2, 4 and 6, and the entries it trained on."""
    tmp = tmp_path_factory.mktemp("trained")
    entries = clips(tmp)
    Trainer(model(), frame_loss, factory(entries), config(save_interval=2, keep_last=3), tmp / "run").train()
    return tmp / "run", entries


@pytest.fixture
def run_copy(trained, tmp_path):
    import shutil

    run, entries = trained
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run", entries


def test_checkpoint_holds_safetensors_weights_and_checksums(trained):
    ckpt = last_checkpoint(trained[0])
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                      "preprocessor_config.json", STATE_FILE]


@pytest.mark.parametrize("file,how", [("model.safetensors", "truncate"), ("model.safetensors", "flip"),
                                      ("model.safetensors", "delete"), (STATE_FILE, "truncate"),
                                      (STATE_FILE, "flip"), (STATE_FILE, "garbage"), (STATE_FILE, "delete"),
                                      ("checksums.json", "garbage"), ("checksums.json", "delete"),
                                      ("checksums.json", "fifo"), (STATE_FILE, "fifo"),
                                      ("config.json", "garbage"), ("config.json", "delete")])
def test_damaged_checkpoint_file_is_named_in_the_error(run_copy, file, how):
    run, entries = run_copy
    ckpt = run / "checkpoint_0000006"
    damage(ckpt / file, how)
    trainer = Trainer(model(), frame_loss, factory(entries), config(), run)
    with pytest.raises(CheckpointError) as info:
        trainer.load_checkpoint(ckpt)
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message
    assert file in message, message
    if file in ("model.safetensors", "config.json"):  # loading it as a model checks the same checksums
        import w2v2
        with pytest.raises(CheckpointError, match=file):
            w2v2.load_model(ckpt)


def test_resume_falls_back_to_the_previous_intact_checkpoint(run_copy, tmp_path, caplog):
    run, entries = run_copy
    damage(run / "checkpoint_0000006" / "model.safetensors", "flip")
    straight = model()
    Trainer(straight, frame_loss, factory(entries), config(), tmp_path / "straight").train()
    resumed = model(seed=99)
    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        result = Trainer(resumed, frame_loss, factory(entries), config(), run).train(resume=True)
    assert "checkpoint_0000006 is damaged" in caplog.text and "model.safetensors: corrupted" in caplog.text
    assert "resumed from the earlier checkpoint_0000004" in caplog.text
    assert (run / "checkpoint_0000006.corrupt").is_dir()  # kept for inspection, out of the way
    assert result["step"] == 6 and last_checkpoint(run).name == "checkpoint_0000006"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


DAMAGES = [("model.safetensors", "flip"), (STATE_FILE, "flip"), ("config.json", "garbage"),
           ("checksums.json", "garbage"), (STATE_FILE, "delete"), ("checksums.json", "delete"),
           ("config.json", "delete"), ("preprocessor_config.json", "delete")]


@pytest.mark.parametrize("form", ["relative", "absolute"])
@pytest.mark.parametrize("file,how", DAMAGES)
def test_a_damaged_or_incomplete_newest_checkpoint_is_set_aside(run_copy, file, how, form, monkeypatch, caplog):
    """Whatever file is damaged or missing, and whether the run directory is given relative or
    absolute (once two paths to one checkpoint, moved twice: "[Errno 2] ... -> .corrupt-..."),
    --resume names it, sets it aside, resumes from the one before and leaves checkpoint_last
    naming an intact checkpoint."""
    run, entries = run_copy
    damage(run / "checkpoint_0000006" / file, how)
    monkeypatch.chdir(run.parent)
    given = Path(run.name) if form == "relative" else run
    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        result = Trainer(model(seed=99), frame_loss, factory(entries), config(), given).train(resume=True)
    assert f"checkpoint_0000006/{file}" in caplog.text
    assert "resumed from the earlier checkpoint_0000004" in caplog.text
    aside = run / "checkpoint_0000006.corrupt"
    assert aside.is_dir() and not (aside / file).exists() if how == "delete" else aside.is_dir()
    assert not list(run.glob("*.corrupt-*"))  # set aside once, not once per path spelling
    assert result["step"] == 6
    assert last_checkpoint(run) == run / "checkpoint_0000006" and (run / "checkpoint_last").resolve().is_dir()
    assert_intact(run)


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_cli_resume_past_a_damaged_checkpoint_is_exact(form, audio, reference, tmp_path, monkeypatch, capsys):
    """The case as reported: `w2v2 pretrain --out runs/c --resume` with one byte of the newest
    model.safetensors flipped: it resumes from the previous checkpoint, sets the damaged one
    aside, exits 0 and ends with the uninterrupted run's weights."""
    import shutil

    run = tmp_path / "runs" / "c"
    shutil.copytree(reference[0], run, symlinks=True)
    damage(run / f"checkpoint_{UPDATES:07d}" / "model.safetensors", "flip")
    monkeypatch.chdir(tmp_path)
    out = "runs/c" if form == "relative" else str(run)
    assert main(["pretrain", str(audio), "--out", out, *PRETRAIN, "--resume"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (run / f"checkpoint_{UPDATES:07d}.corrupt").is_dir() and not list(run.glob("*.corrupt-*"))
    assert_same_as_reference(run, reference[0])


def test_resume_with_every_checkpoint_damaged_is_a_clear_error(run_copy, tmp_path, capsys):
    run, entries = run_copy
    for ckpt in checkpoint_dirs(run):
        damage(ckpt / STATE_FILE, "truncate")
    with pytest.raises(CheckpointError, match="no intact checkpoint to resume from") as info:
        Trainer(model(), frame_loss, factory(entries), config(), run).train(resume=True)
    assert str(info.value).count("trainer_state.pt: corrupted") == 3
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint_0000002", "checkpoint_0000004",
                                                      "checkpoint_0000006"]  # nothing moved


def test_cli_resume_from_damaged_run_is_one_error(audio, reference, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference[0], run, symlinks=True)
    for ckpt in checkpoint_dirs(run):
        damage(ckpt / "model.safetensors", "truncate")
    assert main(["pretrain", str(audio), "--out", str(run), *PRETRAIN, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"w2v2 pretrain: error: {run}: no intact checkpoint")


def test_checkpoint_last_pointing_outside_the_run_is_not_followed(run_copy, tmp_path, caplog):
    """A checkpoint_last naming a directory elsewhere (another run's checkpoint, damaged here) is
    neither used nor touched: the run resumes from its own newest checkpoint."""
    import shutil

    run, entries = run_copy
    elsewhere = tmp_path / "elsewhere" / "checkpoint_0000009"
    shutil.copytree(run / "checkpoint_0000006", elsewhere)
    damage(elsewhere / STATE_FILE, "truncate")
    (run / "checkpoint_last").unlink()
    (run / "checkpoint_last").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING, logger="w2v2.runs"):
        assert last_checkpoint(run) == run / "checkpoint_0000006"
        trainer = Trainer(model(), frame_loss, factory(entries), config(), run)
        assert trainer.resume_latest() == run / "checkpoint_0000006"
    assert f"names {elsewhere}, which is no checkpoint directory of this run: not followed" in caplog.text
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["checkpoint_0000009"]  # not set aside


def test_a_run_directory_with_foreign_files_keeps_them(run_copy):
    """Files a user (or another tool) put in the run directory are neither checkpoints nor
    temporaries: resuming and keep_last leave them alone."""
    run, entries = run_copy
    foreign = {".gitignore": "x", "notes.txt": "x", "checkpoint_notes.txt": "x", "checkpoint_0000001": "a file",
               ".checkpoints.md": "x"}
    for name, text in foreign.items():
        (run / name).write_text(text)
    (run / "checkpoint_old").mkdir()
    (run / "checkpoint_0000003").symlink_to(run / "checkpoint_old")
    Trainer(model(), frame_loss, factory(entries), config(max_updates=8, save_interval=1, keep_last=1),
            run).train(resume=True)
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint_0000008"]
    for name, text in foreign.items():
        assert (run / name).read_text() == text
    assert (run / "checkpoint_old").is_dir() and (run / "checkpoint_0000003").is_symlink()


@pytest.mark.parametrize("out", ["a_file", "a_file/run"])
def test_a_run_directory_that_cannot_be_one_is_one_error(out, audio, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("a_file").write_text("not a directory")
    assert main(["pretrain", str(audio), "--out", out, *PRETRAIN]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"w2v2 pretrain: error: {out}: cannot be the run directory ("), err[-1]
    assert Path("a_file").read_text() == "not a directory"


def test_stale_temporaries_of_killed_runs_go_and_a_running_writers_stay(tmp_path):
    """A run directory's start-up removes what killed processes left (an atomic write's temporary
    named after a dead process, temporary checkpoint directories and links), but not the
    temporary of a writer still running (another process writing a file there), whose name
    carries its live process id."""
    run = tmp_path / "run"
    run.mkdir()
    writer = ("import sys, time\nfrom w2v2.fileio import atomic_open\n"
              "with atomic_open(sys.argv[1]) as f:\n    print('ready', flush=True)\n    time.sleep(120)\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(run / name)], env=ENV, stdout=subprocess.PIPE,
                              text=True) for name in ("pretrain_config.json", "plot.json")]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        killed, running = procs
        killed.kill()
        killed.wait()
        temporaries = sorted(p.name for p in run.iterdir())
        stale_tmp = next(n for n in temporaries if n.startswith(".pretrain_config.json."))
        live_tmp = next(n for n in temporaries if n.startswith(".plot.json."))
        (run / ".checkpoint_0000002.4242.tmp").mkdir()
        (run / ".checkpoint_0000002.4242.tmp" / "model.safetensors").write_bytes(b"half")
        (run / ".checkpoint_0000001.deleting-4242").mkdir()
        os.symlink("checkpoint_0000002", run / ".checkpoint_last.4242.tmp")
        (run / ".best.4242.tmp").mkdir()
        (run / ".best.old").mkdir()  # killed between best/'s two renames: the previous best model
        (run / ".best.old" / "best.json").write_text("{}")
        Trainer(model(), frame_loss, None, config(), run)
        left = sorted(p.name for p in run.iterdir())
        assert left == sorted([LOCK_FILE, live_tmp, "best"]), left
        assert (run / "best" / "best.json").read_text() == "{}"
        assert stale_tmp not in left
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_checkpoints_respect_the_umask(tmp_path):
    """Checkpoint directories and their files get the permissions the umask allows, like any
    file the user makes (a checkpoint directory was once 0700 whatever the umask). In a child
    process each: a process reads its umask once."""
    code = ("import sys\nfrom pathlib import Path\n"
            "from tests.test_trainer import clips, config, factory, frame_loss, model\n"
            "from w2v2.trainer import Trainer\ntmp = Path(sys.argv[1])\n"
            "Trainer(model(), frame_loss, factory(clips(tmp, 2)), config(max_updates=1), tmp / 'run').train()\n")
    for umask in (0o022, 0o077):
        tmp = tmp_path / f"{umask:o}"
        subprocess.run([sys.executable, "-c", code, str(tmp)], env=ENV, cwd=ROOT, check=True,
                       preexec_fn=lambda: os.umask(umask))
        ckpt = last_checkpoint(tmp / "run")
        assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask
        for f in ckpt.iterdir():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_two_runs_in_one_directory_at_once_are_refused(audio, tmp_path, capsys):
    """A second process training in a run directory would interleave checkpoints and metric
    rows: refused with one line naming the directory and the process holding it. The lock
    dies with its holder (kill -9 included), so it never needs cleaning up."""
    run = tmp_path / "run"
    run.mkdir()
    holder = ("import sys, time\nfrom w2v2.runs import RunLock\nRunLock(sys.argv[1]).acquire()\n"
              "print('ready', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(run)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(RunError, match=f"another process \\(pid {proc.pid} on "):
            Trainer(model(), frame_loss, None, config(), run)
        assert main(["pretrain", str(audio), "--out", str(run), *PRETRAIN]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"w2v2 pretrain: error: {run}: another process (pid {proc.pid} on ")
        assert err[-1].endswith("is training in this run directory; wait for it to end, or choose another directory")
        assert not checkpoint_dirs(run)
    finally:
        proc.kill()
        proc.wait()
    lock = RunLock(run)
    lock.acquire()  # free again
    lock.release()


def test_disk_full_during_a_checkpoint_save_is_one_error_and_keeps_the_earlier_ones(audio, tmp_path, capsys,
                                                                                   monkeypatch):
    import w2v2.runs as runs

    real, calls = runs.write_checksums, [0]

    def full(directory):
        calls[0] += 1
        if calls[0] == 3:
            (Path(directory) / "filler").write_bytes(b"x")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "filler"))
        return real(directory)

    monkeypatch.setattr(runs, "write_checksums", full)
    run = tmp_path / "run"
    assert main(["pretrain", str(audio), "--out", str(run), *PRETRAIN, "--keep-last", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"w2v2 pretrain: error: {run / 'checkpoint_0000003'}: cannot save the checkpoint "
                       "(No space left on device); the earlier checkpoints are intact"), err[-1]
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint_0000001", "checkpoint_0000002"]
    assert_intact(run)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
    monkeypatch.setattr(runs, "write_checksums", real)
    resume_to_the_end(audio, run)  # space again: the run goes on from checkpoint_0000002
    assert last_checkpoint(run).name == f"checkpoint_{UPDATES:07d}"


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of a given size (needs the right to mount: skipped where there is none)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / "small"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small file system here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_really_full_file_system_during_a_save_keeps_the_run_resumable(trained, small_filesystem, tmp_path):
    """A file system with room for two and a half checkpoints: the third save fails with ENOSPC
    for real; the error names that checkpoint, its temporary is gone, the two before are intact,
    and the run resumes from them elsewhere."""
    import shutil

    run, entries = trained
    size = sum(f.stat().st_size for f in last_checkpoint(run).iterdir())
    disk = small_filesystem(size * 5 // 2 + 64 * 1024)  # + metric files and directory blocks
    full = disk / "run"
    with pytest.raises(RunError, match=r"cannot save the checkpoint \(No space left on device\)") as info:
        Trainer(model(), frame_loss, factory(entries), config(save_interval=1, keep_last=0), full).train()
    kept = checkpoint_dirs(full)
    assert len(kept) == 2 and str(info.value).startswith(f"{full / 'checkpoint_0000003'}: ")
    assert_intact(full)
    assert [p.name for p in full.iterdir() if p.name.startswith(".")] == [LOCK_FILE]  # the temporary is gone
    shutil.copytree(full, tmp_path / "moved", symlinks=True)
    result = Trainer(model(), frame_loss, factory(entries), config(), tmp_path / "moved").train(resume=True)
    assert result["step"] == 6


def test_a_full_file_system_at_the_start_is_one_error(small_filesystem, trained):
    """No room for even the run's first file: a RunError naming the place (the CLI's one line),
    the run lock taken all the same (it needs no room), nothing written as if complete."""
    disk = small_filesystem(256 * 1024)
    with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:  # its close fails too
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    run = disk / "run"
    with pytest.raises(RunError, match=r"cannot write \(No space left on device\)") as info:
        Trainer(model(), frame_loss, factory(trained[1]), config(), run).train()
    assert str(run) in str(info.value) and "\n" not in str(info.value)
    assert not checkpoint_dirs(run) and not (run / "train_config.json").exists()


def test_disk_full_while_writing_metrics_is_one_error_naming_the_file(tmp_path, monkeypatch):
    import builtins

    import w2v2.runs as runs

    real_open, calls = builtins.open, [0]

    def full(path, mode="r", *a, **k):
        if mode == "a" and str(path).endswith("metrics.jsonl"):
            calls[0] += 1
            if calls[0] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(runs, "open", full, raising=False)  # the metric log's open, nobody else's
    entries = clips(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(RunError, match=r"metrics.jsonl: cannot write the metrics \(No space left on device\)"):
        Trainer(model(), frame_loss, factory(entries), config(save_interval=2), run).train()
    assert [p.name for p in checkpoint_dirs(run)] == ["checkpoint_0000002"]
    monkeypatch.undo()
    assert Trainer(model(), frame_loss, factory(entries), config(), run).train(resume=True)["step"] == 6


def test_resume_with_another_architecture_says_so(run_copy):
    run, entries = run_copy
    trainer = Trainer(model(hidden_size=64, intermediate_size=64), frame_loss, factory(entries), config(), run)
    with pytest.raises(CheckpointError, match="different model than this run's"):
        trainer.load_checkpoint(run / "checkpoint_0000006")


# ---------------------------------------------------------------------------- non-finite values
def test_non_finite_gradient_is_skipped_and_logged(tmp_path, caplog):
    """A finite loss whose gradient is NaN (sqrt at 0): the update is skipped, the weights untouched."""
    entries = clips(tmp_path)
    calls = {"n": 0}

    def loss_fn(m, batch):
        loss, n, metrics = frame_loss(m, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            loss = loss + (0 * next(m.parameters()).sum()).sqrt()  # value +0, gradient inf * 0 = NaN
        return loss, n, metrics

    m = model()
    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        trainer = Trainer(m, loss_fn, factory(entries), config(max_updates=3), tmp_path / "run")
        trainer.train()
    assert "update 2 skipped: non-finite gradient" in caplog.text
    assert [r["skipped"] for r in read_metrics(tmp_path / "run")] == [0, 1, 0, 0]
    assert trainer.skipped == 1 and all(torch.isfinite(v).all() for v in m.state_dict().values())


def test_non_finite_loss_is_logged_and_endless_divergence_stops(tmp_path, caplog):
    entries = clips(tmp_path)

    def nan_loss(m, batch):
        loss, n, metrics = frame_loss(m, batch)
        return loss * float("nan"), n, metrics

    with caplog.at_level(logging.WARNING, logger="w2v2.trainer"):
        with pytest.raises(RuntimeError, match="3 updates in a row had non-finite loss"):
            Trainer(model(), nan_loss, factory(entries), config(max_consecutive_skips=3), tmp_path / "run").train()
    assert caplog.text.count("skipped: non-finite loss") == 3


def test_nan_audio_mid_run_is_replaced_by_the_next_file(tmp_path, caplog):
    """A file whose header is fine passes validation; its NaN samples are caught when it is read."""
    paths = write_clips(tmp_path, [0.3, 0.4])
    x = np.zeros(4800, np.float32)
    x[100] = np.nan
    sf.write(paths[0], x, 16000, subtype="FLOAT")
    good, bad = data.validate_entries(data.list_entries([tmp_path]))
    assert len(good) == 2 and not bad
    item = data.AudioDataset(good, max_samples=None)[0]
    assert item["index"] == 1 and torch.isfinite(item["wav"]).all()
    assert "NaN or infinite" in caplog.text


# ---------------------------------------------------------------------------- safe loading
def test_every_torch_load_is_weights_only():
    """No pickle can run code: every torch.load in the code passes weights_only=True; nothing
    else unpickles (pickle, numpy allow_pickle)."""
    sources = sorted(ROOT.glob("w2v2/**/*.py")) + sorted(ROOT.glob("recipes/**/*.py")) + \
        sorted(ROOT.glob("benchmarks/**/*.py"))
    loads = []
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n in ("pickle", "cPickle", "dill", "joblib") for n in names), f"{path}:{node.lineno}"
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            if func in ("torch.load", "torch.serialization.load"):
                loads.append(path.relative_to(ROOT).as_posix())
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{node.lineno}: {func}"
            if func in ("np.load", "numpy.load"):
                flag = kwargs.get("allow_pickle")
                assert flag is None or isinstance(flag, ast.Constant) and flag.value is False, f"{path}:{node.lineno}"
    # one reader for every torch file (trainer states, pytorch_model.bin, fairseq checkpoints), with
    # its checks of memory and regular files
    assert loads == ["w2v2/safeload.py"]

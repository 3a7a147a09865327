"""Training on two machines, simulated as two torchrun "nodes" on this one over loopback: the
documented launch (c10d rendezvous, ``--max-restarts``, ``--resume``), one node's worker killed
(SIGKILL) mid-run, torchrun restarting every worker, and the run finishing with the same weights,
optimizer state and metrics as an uninterrupted two-node run; under DDP and under ``--fsdp``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from w2v2.trainer import checkpoint_dirs, read_metrics

from .helpers import write_clips
from .test_crash_safety import assert_intact, assert_same_as_reference

ROOT = Path(__file__).resolve().parents[1]
UPDATES = 10  # as test_crash_safety's reference comparison expects
PRETRAIN = ["--preset", "tiny", "--no-progress", "--max-tokens", "24000", "--max-updates", str(UPDATES),
            "--save-interval", "1", "--keep-last", "2", "--seed", "5", "--device", "cpu"]
# each worker adds its process id to its node's list (one line per start) for the test to kill, then runs the CLI
WORKER = """import os, sys
with open(os.path.join(sys.argv[1], os.environ["NODE_TAG"]), "a") as f:
    f.write(f"{os.getpid()}\\n")
from w2v2.cli import main
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, audio: Path, run: Path, name: str, extra: tuple = ()) -> list[subprocess.Popen]:
    """Two torchrun agents, one worker each, meeting at a c10d rendezvous on 127.0.0.1: the
    command docs/scale.md gives for two machines, with 1 process per node instead of 8."""
    script, pids = tmp / "worker.py", tmp / f"{name}.pids"
    script.write_text(WORKER)
    pids.mkdir()
    port = free_port()
    nodes = []
    for tag in ("a", "b"):
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a restart's workers then meet in a store of their own;
        # the store shared with the rendezvous still holds the killed attempt's addresses, and the
        # new workers dialled those (pytorch/pytorch#135712; "Connection refused" on every restart)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NODE_TAG": tag,
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name,
               "--local-addr", "127.0.0.1", "--max-restarts", "2", "--monitor-interval", "0.2",
               str(script), str(pids), "pretrain", str(audio), "--out", str(run), *PRETRAIN, *extra, "--resume"]
        log = open(tmp / f"{name}.{tag}.log", "w")
        nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return nodes


def wait(nodes: list[subprocess.Popen], tmp: Path, name: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    logs = "\n".join((tmp / f"{name}.{tag}.log").read_text()[-3000:] for tag in ("a", "b"))
    assert [n.returncode for n in nodes] == [0, 0], logs


@pytest.mark.usefixtures("one_thread")
# two torchrun jobs of two nodes each, one restarted: 70-140 s (DDP), 100 s and more (FSDP) on 2 shared cores
@pytest.mark.parametrize("sharding", [pytest.param((), id="ddp"), pytest.param(("--fsdp",), id="fsdp",
                                                                                marks=pytest.mark.slow)])
def test_two_nodes_one_killed_and_restarted_by_torchrun_end_as_if_uninterrupted(sharding, tmp_path):
    folder = tmp_path / "clips"
    write_clips(folder, [0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3])
    audio = folder / "audio"
    reference = tmp_path / "reference"
    wait(launch(tmp_path, audio, reference, "reference", sharding), tmp_path, "reference")

    run = tmp_path / "run"
    nodes = launch(tmp_path, audio, run, "killed", sharding)
    deadline = time.monotonic() + 180
    # once a few checkpoints exist, node b's worker dies at once (a lost machine, as its workers see it)
    while len(read_metrics(run)) < 3 if (run / "metrics.jsonl").exists() else True:
        assert all(n.poll() is None for n in nodes) and time.monotonic() < deadline, "the run ended or stalled"
        time.sleep(0.05)
    os.kill(int((tmp_path / "killed.pids" / "b").read_text()), signal.SIGKILL)
    killed_at = len(read_metrics(run))
    wait(nodes, tmp_path, "killed")

    starts = {tag: (tmp_path / "killed.pids" / tag).read_text().split() for tag in ("a", "b")}
    assert [len(pids) for pids in starts.values()] == [2, 2], starts  # torchrun restarted both nodes' workers
    assert killed_at < UPDATES and len(checkpoint_dirs(run)) == 2
    assert_intact(run)
    assert_same_as_reference(run, reference)


def test_a_torchrun_restart_without_resume_says_to_launch_with_it(tmp_path, monkeypatch, capsys):
    """The first attempt started the run, so a restart without --resume finds it and stops: the
    message says why it happens under torchrun and what the launch command needs."""
    from w2v2.cli import main

    write_clips(tmp_path / "clips", [0.6])
    argv = ["pretrain", str(tmp_path / "clips" / "audio"), "--out", str(tmp_path / "run"), "--preset", "tiny"]
    (tmp_path / "run" / "checkpoint_0000002").mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "torchrun restarted this job" in err and "--resume" in err, err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert main(argv) == 1
    assert "torchrun restarted" not in capsys.readouterr().err


def test_fine_tuning_refuses_fsdp_before_reading_anything(tmp_path):
    from w2v2.finetune import FinetuneTrainConfig, finetune

    with pytest.raises(ValueError, match="fsdp is for pretraining"):
        finetune("missing-model", [str(tmp_path / "missing.tsv")], [str(tmp_path / "missing.tsv")], tmp_path / "run",
                 train_cfg=FinetuneTrainConfig(fsdp=True))
    assert not (tmp_path / "run").exists()


def test_a_collective_failing_because_a_peer_died_is_one_line_not_an_internal_error(monkeypatch, capsys):
    """The survivors of a killed process fail in their next collective: the CLI says so, not "internal error"."""
    import torch.distributed  # noqa: F401  (a distributed job has it loaded; the CLI looks only then)

    from w2v2 import cli
    from w2v2.commands import plot

    def lost(_args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:7")

    monkeypatch.setattr(plot, "run", lost)
    assert cli.main(["plot", "somewhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another process of the distributed job failed" in err[0] and "internal" not in err[0]

    def bug(_args):
        raise RuntimeError("shapes (2, 3) and (4, 5) do not match")

    monkeypatch.setattr(plot, "run", bug)
    assert cli.main(["plot", "somewhere"]) == 1
    assert "internal error" in capsys.readouterr().err

"""Inference across processes (w2v2/shard.py): the split, and real torchrun jobs of 2 CPU processes (gloo).

Each job runs ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m w2v2 ...`` on real
clips and is compared with the same command in one process (the jobs marked slow take ~40 s each
on a loaded 2-core machine, most of it starting the processes). The clips are longer than the chunk
(``--chunk-seconds``), so no forward pass mixes two files: the outputs then do not depend on which
files share a process, and must be byte-identical.
"""

from __future__ import annotations

import collections
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from w2v2.distributed import DistInfo
from w2v2.evaluate import Hypothesis, Utterance, evaluate, merge_results
from w2v2.shard import balance, gather, my_share

from .conftest import DATA, ROOT, read_manifest

CHUNKING = ["--chunk-seconds", "4", "--stride-seconds", "1", "--device", "cpu"]  # every clip below is > 5 s


# --------------------------------------------------------------------------- the split
def test_balance_hand_computed():
    # longest first into the least loaded: 5->a, 4->b, 3->b (4<5), 3->a (5<7), 2->b (7<8), 1->a (8<9)
    assert balance([5, 4, 3, 3, 2, 1], 2) == [[0, 3, 5], [1, 2, 4]]  # 9 and 9 (round-robin: 10 and 8)
    assert balance([1, 1, 1, 1], 2) == [[0, 2], [1, 3]]  # ties: lower index first, into the lower part
    assert balance([10, 1, 1, 1, 1], 3) == [[0], [1, 3], [2, 4]]  # one long file gets a process to itself
    assert balance([2.0], 3) == [[0], [], []]
    assert balance([float("nan"), 3, float("inf"), -1, 2], 2) == [[1], [0, 2, 3, 4]]  # odd lengths count as 0
    assert balance([], 2) == [[], []]
    with pytest.raises(ValueError, match="parts must be at least 1"):
        balance([1.0], 0)


@given(st.lists(st.floats(0, 1e4), max_size=60), st.integers(1, 8))
def test_balance_covers_every_input_once_and_evens_the_load(weights, parts):
    split = balance(weights, parts)
    assert sorted(i for part in split for i in part) == list(range(len(weights)))
    assert split == balance(list(weights), parts)  # deterministic
    loads = [sum(weights[i] for i in part) for part in split]
    # the part that got the last input of the largest was the least loaded then
    assert max(loads) - min(loads) <= max(weights, default=0) * (1 + 1e-9) + 1e-9


def test_one_process_runs_everything_without_measuring_anything():
    def never(_):
        raise AssertionError("a single process needs no durations")

    assert my_share(["a", "b", "c"], never, DistInfo(0, 1)) == [0, 1, 2]
    assert my_share(["a", "bbb", "cc"], len, DistInfo(1, 2)) == [0, 2]  # "bbb" on rank 0, 2+1 on rank 1
    assert gather({"x": 1}) == [{"x": 1}]


class TextEngine:
    """A fixed hypothesis per path, whatever order it is asked in; each file lasts 1 s."""

    name, case = "fixed", "upper"

    def __init__(self, texts: dict[str, str]):
        self.texts = texts

    def transcribe(self, paths):
        return [Hypothesis(self.texts[p], 1.0) for p in paths]


def test_scores_of_the_parts_merge_into_the_whole_corpus_figures():
    refs = ["the cat sat", "a dog", "on the mat today", "yes", "one two three four five"]
    hyps = ["the cat sad", "a dog", "on mat", "no", "one two three four five six"]
    utts = [Utterance(f"u{i}", r, seconds=len(r)) for i, r in enumerate(refs)]
    engine = TextEngine({f"u{i}": h for i, h in enumerate(hyps)})
    whole = evaluate(engine, utts)
    split = balance([u.seconds for u in utts], 2)
    merged = merge_results([(part, evaluate(engine, [utts[i] for i in part])) for part in split])
    assert (merged.wer, merged.cer) == (whole.wer, whole.cer)
    assert merged.wer == pytest.approx((1 + 0 + 2 + 1 + 1) / (3 + 2 + 4 + 1 + 5))  # total edits / total words
    assert merged.wer != pytest.approx(sum(r.wer for _, r in [(p, evaluate(engine, [utts[i] for i in p]))
                                                             for p in split]) / 2)  # not the mean of the parts
    assert merged.utterances == whole.utterances  # back in manifest order
    assert merged.audio_seconds == whole.audio_seconds == 5.0


# --------------------------------------------------------------------------- real torchrun jobs
@pytest.fixture(scope="module")
def long_clips() -> list[str]:
    folder = DATA / "ljspeech-amateur"
    if not (folder / "manifest.tsv").exists():
        pytest.skip(f"real speech not found at {folder}")
    rows = [r for r in read_manifest(folder) if float(r["seconds"]) > 5][:7]
    return [str(folder / r["path"]) for r in rows]


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def w2v2(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m w2v2 ARGS`` in one process."""
    return subprocess.run([sys.executable, "-m", "w2v2", *map(str, args)], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


def torchrun(*args, restarts: int = 0, entry=("-m", "w2v2"), env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m w2v2 ARGS`` (a free port
    is picked by the c10d rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), *entry, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout)


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert files_a
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def test_transcribe_on_two_processes_writes_what_one_process_writes(long_clips, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    r = w2v2("transcribe", *long_clips, "--model", tiny_model_dir, "-o", one, "-f", "all", *CHUNKING)
    assert r.returncode == 0, r.stderr
    r = torchrun("transcribe", *long_clips, "--model", tiny_model_dir, "-o", two, "-f", "all", *CHUNKING)
    assert r.returncode == 0, r.stderr
    same_tree(one, two)
    assert not [p for p in two.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow  # a torchrun job: ~40 s on a loaded 2-core machine
def test_embed_on_two_processes_writes_what_one_process_writes(long_clips, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--model", tiny_model_dir, "--layers", "0,2", "--batch-size", "1", "--device", "cpu"]
    r = w2v2("embed", *long_clips, *common, "--output-dir", one)
    assert r.returncode == 0, r.stderr
    r = torchrun("embed", *long_clips, *common, "--output-dir", two)
    assert r.returncode == 0, r.stderr
    same_tree(one, two)
    assert r.stderr.count(f"{len(long_clips)} of {len(long_clips)} files embedded") == 1  # rank 0 says it


@pytest.mark.slow  # a torchrun job: ~40 s on a loaded 2-core machine
def test_evaluate_on_two_processes_prints_the_single_process_corpus_figures(long_clips, tiny_model_dir, tmp_path):
    rows = {r["path"]: r for r in read_manifest(DATA / "ljspeech-amateur")}
    manifest = tmp_path / "m.tsv"
    manifest.write_text("path\tseconds\ttext\n" + "".join(
        f"{p}\t{rows['audio/' + Path(p).name]['seconds']}\t{rows['audio/' + Path(p).name]['text']}\n"
        for p in long_clips))
    args = ["evaluate", "--model", tiny_model_dir, "--data", manifest, *CHUNKING]
    one = w2v2(*args, "--out", tmp_path / "one.tsv")
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", tmp_path / "two.tsv")
    assert two.returncode == 0, two.stderr

    def figures(stdout: str) -> list[str]:  # utts, words, WER %, CER % of the table's row (not the RTF)
        row = stdout.strip().splitlines()[-1].split()
        return row[-5:-1]

    assert figures(two.stdout) == figures(one.stdout)
    assert figures(one.stdout)[0] == str(len(long_clips))
    assert two.stdout.count("WER") == 1  # one table, from rank 0
    assert (tmp_path / "two.tsv").read_text() == (tmp_path / "one.tsv").read_text()


def test_a_rank_killed_mid_job_is_restarted_and_nothing_is_lost_or_done_twice(long_clips, tiny_model_dir, tmp_path):
    one, two, writes = tmp_path / "one", tmp_path / "two", tmp_path / "writes.log"
    args = ["transcribe", *long_clips, "--model", tiny_model_dir, "-f", "all", *CHUNKING]
    assert w2v2(*args, "-o", one).returncode == 0
    r = torchrun(*args, "-o", two, "--skip-existing", restarts=1, entry=[str(ROOT / "tests" / "torchrun_faults.py")],
                 env=_env(W2V2_TEST_WRITES=str(writes), W2V2_TEST_KILL_RANK="1"))
    assert r.returncode == 0, r.stderr
    log = [line.split("\t") for line in writes.read_text().splitlines()]
    killed = [name for attempt, rank, name in log if (attempt, rank) == ("0", "1")]
    assert len(killed) == 1  # rank 1 died right after its first file
    assert any(attempt == "1" for attempt, _, _ in log)  # the job was restarted and did the rest
    done = collections.Counter(name for _, _, name in log)
    assert set(done) <= {Path(p).stem for p in long_clips} and max(done.values()) == 1  # nothing twice
    assert "skipping" in r.stderr  # the restart left out what the first attempt had finished
    same_tree(one, two)  # nothing lost, nothing partial
    assert not [p for p in two.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow  # a torchrun job: ~40 s on a loaded 2-core machine
def test_a_bad_file_on_one_rank_is_counted_once_and_the_others_carry_on(long_clips, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wave file" * 10)
    out = tmp_path / "out"
    r = torchrun("transcribe", bad, *long_clips, "--model", tiny_model_dir, "-o", out, *CHUNKING)
    assert r.returncode != 0
    assert sum(line.startswith(f"{bad}: ") for line in r.stderr.splitlines()) == 1
    assert r.stderr.count(f"1 of {len(long_clips) + 1} input(s) failed") == 1  # the job's count, said once
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(p).stem}.txt" for p in long_clips)


@pytest.mark.slow  # a torchrun job: ~40 s on a loaded 2-core machine
def test_a_rank_that_hangs_does_not_hang_the_job(long_clips, tiny_model_dir, tmp_path):
    r = torchrun("transcribe", *long_clips[:4], "--model", tiny_model_dir, "-o", tmp_path / "out", *CHUNKING,
                 entry=[str(ROOT / "tests" / "torchrun_faults.py")], timeout=240,
                 env=_env(W2V2_TEST_WRITES=str(tmp_path / "writes.log"), W2V2_TEST_HANG_RANK="1",
                          W2V2_GATHER_TIMEOUT="5"))
    assert r.returncode != 0
    assert "the other processes did not all finish within 5 s (W2V2_GATHER_TIMEOUT)" in r.stderr


def test_several_processes_refuse_standard_output(long_clips, tiny_model_dir, monkeypatch, capsys):
    from w2v2.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; refused before any process group is needed
    assert main(["transcribe", long_clips[0], "--model", str(tiny_model_dir)]) == 2
    assert "several processes write files, not standard output: give an --output-dir" in capsys.readouterr().err
    assert main(["embed", long_clips[0], "--model", str(tiny_model_dir), "--output", "x.safetensors"]) == 2
    assert "several processes need --output-dir" in capsys.readouterr().err


@pytest.mark.slow  # two transcription jobs, one of them under torchrun
def test_benchmark_quick_run_prints_both_rows(data_dir):
    env = _env(W2V2_DATA=str(data_dir))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shard.py"), "--quick", "--args",
                        " ".join(CHUNKING)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])}
    assert set(rows) == {"1", "2"}, r.stdout
    for row in rows.values():
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[-1] == "yes", r.stdout

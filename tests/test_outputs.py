"""The output side of the commands under hostile conditions: a full disk (fault injection, and a
real full tmpfs where one can be mounted), read-only folders, an --output-dir that is a file, an
output that is a folder, name clashes, names too long or not UTF-8, a full standard output, the
temporaries of killed runs.

Every case ends in one line naming the real path, exit status 1 (2 for a usage error), an
input's outputs complete or as they were before (never a mix), and the rest of the batch written.
``output_cases`` builds the hostile situations as data, for the bad-input corpus to drive too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import read_manifest
from w2v2.cli import main
from w2v2.writers import WRITERS, WriteJSON, output_names

pytestmark = pytest.mark.usefixtures("one_thread")
FORMATS = list(WRITERS)


@pytest.fixture(scope="module")
def clips(data_dir):
    """Three short real utterances."""
    rows = read_manifest(data_dir / "speechocean762-train")[:3]
    return [data_dir / "speechocean762-train" / r["path"] for r in rows]


def cli(*argv) -> int:
    return main(["transcribe", *map(str, argv)])


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def temporaries(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob(".*.tmp")]


def mark_previous(out: Path, name: str) -> None:
    """Stand-ins for a previous run's outputs, told apart from any new ones by their content."""
    for fmt in FORMATS:
        (out / f"{name}.{fmt}").write_text(f"previous {fmt}")


def is_previous(out: Path, name: str) -> bool:
    return all((out / f"{name}.{fmt}").read_text() == f"previous {fmt}" for fmt in FORMATS)


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int, *options: str):
    """A small tmpfs at ``path`` (needs root: tests run as root here and in CI); skips where the
    mount is refused."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size_kb}k", *options]), "tmpfs",
                                  str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until its file system is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
    return filler


# ---------------------------------------------------------------------------- a full disk
def test_disk_full_keeps_that_inputs_previous_outputs_and_the_batch_goes_on(tiny_model_dir, clips, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "out"
    a, b = (Path(c).stem for c in clips[:2])
    out.mkdir()
    mark_previous(out, a)
    mark_previous(out, b)
    real = WriteJSON.write_result
    calls = []

    def first_json_hits_a_full_disk(self, result, file):
        calls.append(1)
        if len(calls) == 1:  # a's JSON, after its txt, srt and vtt temporaries were written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, result, file)

    monkeypatch.setattr(WriteJSON, "write_result", first_json_hits_a_full_disk)
    assert cli(*clips[:2], "--model", tiny_model_dir, "-f", "all", "-o", out) == 1
    lines = error_lines(capsys)
    assert lines == [f"{clips[0]}: cannot write {out / a}.json: No space left on device", "1 of 2 input(s) failed"]
    assert is_previous(out, a)  # all or nothing: none of a's five files changed
    assert all((out / f"{b}.{fmt}").read_text() != f"previous {fmt}" for fmt in FORMATS)
    json.loads((out / f"{b}.json").read_text())
    assert temporaries(out) == []


def test_disk_full_twice_in_a_row_stops_the_batch(tiny_model_dir, clips, tmp_path, monkeypatch, capsys):
    import w2v2.transcribe

    def no_space(self, result, file):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    decoded = []
    real_decode = w2v2.transcribe.Transcriber.decode
    monkeypatch.setattr(w2v2.transcribe.Transcriber, "decode", lambda self, em: decoded.append(1) or real_decode(self, em))
    monkeypatch.setattr(WriteJSON, "write_result", no_space)
    out = tmp_path / "out"
    assert cli(*clips, "--model", tiny_model_dir, "-f", "json", "-o", out) == 1
    lines = error_lines(capsys)
    assert lines[:2] == [f"{c}: cannot write {out / Path(c).stem}.json: No space left on device" for c in clips[:2]]
    assert lines[2:] == ["stopping: nothing more can be written (No space left on device); 1 input(s) not transcribed",
                         "3 of 3 input(s) failed"]
    assert len(decoded) == 2  # the third input was never transcribed
    assert os.listdir(out) == []


def test_a_real_full_file_system(tiny_model_dir, clips, tmp_path, capsys):
    a, b = (Path(c).stem for c in clips[:2])
    with tmpfs(tmp_path / "small", 512) as out:
        assert cli(clips[0], "--model", tiny_model_dir, "-f", "all", "-o", out) == 0
        mark_previous(out, a)
        filler = fill(out)
        capsys.readouterr()
        assert cli(*clips[:2], "--model", tiny_model_dir, "-f", "all", "-o", out) == 1
        lines = error_lines(capsys)
        assert lines[0].startswith(f"{clips[0]}: cannot write {out / a}.") and lines[0].endswith(
            ": No space left on device"), lines
        assert lines[1].startswith(f"{clips[1]}: cannot write {out / b}.")
        assert lines[2:] == ["stopping: nothing more can be written (No space left on device); "
                             "0 input(s) not transcribed", "2 of 2 input(s) failed"]
        assert is_previous(out, a) and not list(out.glob(f"{b}.*"))
        assert temporaries(out) == []
        filler.unlink()
        assert cli(*clips[:2], "--model", tiny_model_dir, "-f", "all", "-o", out) == 0
        assert not is_previous(out, a) and len(list(out.glob(f"{b}.*"))) == 5


# ---------------------------------------------------------------------------- folders and files in the way
def test_output_dir_that_is_a_file_is_a_usage_error(tiny_model_dir, clips, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    for target in (file, file / "sub"):
        with pytest.raises(SystemExit) as stop:
            cli(clips[0], "--model", tiny_model_dir, "-o", target)
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("w2v2 transcribe: error: argument --output-dir/-o:") and err.endswith(
            f"{file} is a file, not a folder")
    assert file.read_text() == "keep me"


def test_an_output_that_is_a_folder_fails_that_input_only(tiny_model_dir, clips, tmp_path, capsys):
    out = tmp_path / "out"
    (out / f"{Path(clips[0]).stem}.txt").mkdir(parents=True)
    assert cli(*clips[:2], "--model", tiny_model_dir, "-o", out) == 1
    assert error_lines(capsys) == [
        f"{clips[0]}: output {out / Path(clips[0]).stem}.txt is a folder; it is not replaced", "1 of 2 input(s) failed"]
    assert (out / f"{Path(clips[1]).stem}.txt").read_text().strip()


def test_read_only_output_folder_is_named_before_any_work(tiny_model_dir, clips, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", 64, "ro") as out:
        assert cli(clips[0], "--model", tiny_model_dir, "-o", out) == 1
        assert error_lines(capsys) == [f"w2v2 transcribe: error: cannot write in {out}: Read-only file system"]
        assert main(["align", str(clips[0]), "hello", "--model", str(tiny_model_dir), "-o", str(out)]) == 1
        assert error_lines(capsys) == [f"w2v2 align: error: cannot write in {out}: Read-only file system"]


def test_a_subfolder_that_cannot_be_written_fails_its_inputs_only(tiny_model_dir, clips, tmp_path, monkeypatch, capsys):
    """Permissions can't stop root, so the refusal is injected where the file is created."""
    tree = tmp_path / "in"
    for sub, clip in zip("ab", clips[:2]):
        (tree / sub).mkdir(parents=True)
        shutil.copy(clip, tree / sub)
    out = tmp_path / "out"
    real_open = os.open

    def refuse_in_a(path, flags, *args, **kwargs):
        if os.fspath(path).startswith(os.fspath(out / "a") + os.sep) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_in_a)
    assert cli(tree, "--model", tiny_model_dir, "-o", out) == 1
    a, b = (Path(c).stem for c in clips[:2])
    assert error_lines(capsys) == [f"{tree / 'a' / Path(clips[0]).name}: cannot create {a}.txt in {out / 'a'}: "
                                   "Permission denied", "1 of 2 input(s) failed"]
    assert (out / "b" / f"{b}.txt").exists() and temporaries(out) == []


# ---------------------------------------------------------------------------- names
def make_clashing_tree(root: Path, clip: Path) -> list[Path]:
    """dup/a/talk.flac, dup/a/talk.wav, dup/b/talk.flac (issue 15: one talk.txt came out of three)."""
    audio, sr = sf.read(clip, dtype="float32")
    paths = [root / "a" / "talk.flac", root / "a" / "talk.wav", root / "b" / "talk.flac"]
    for i, p in enumerate(paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        sf.write(p, audio[: len(audio) * (i + 2) // 4], sr)  # different audio, so different outputs
    return paths


def test_same_names_in_a_folder_each_get_their_own_outputs(tiny_model_dir, clips, tmp_path, capsys):
    dup = tmp_path / "dup"
    inputs = make_clashing_tree(dup, clips[0])
    out = tmp_path / "out"
    assert cli(dup, "--model", tiny_model_dir, "-f", "json", "-o", out) == 0
    assert capsys.readouterr().err == ""  # no warnings: nothing is lost
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert written == ["a/talk.flac.json", "a/talk.wav.json", "b/talk.json"]
    durations = [json.loads((out / w).read_text())["metadata"]["duration"] for w in written]
    assert durations == pytest.approx([sf.info(p).duration for p in inputs], abs=0.01)
    assert cli(dup, "--model", tiny_model_dir, "-f", "json", "-o", out, "--skip-existing") == 0
    assert "skipping 3 input(s)" in capsys.readouterr().err


def test_clashing_inputs_are_refused_before_any_work(clips, tmp_path, capsys):
    inputs = make_clashing_tree(tmp_path / "dup", clips[0])
    out = tmp_path / "out"
    for clash in ([inputs[0], inputs[2]], [inputs[0], inputs[0]], [inputs[2].parent, inputs[0]]):
        assert cli(*clash, "--model", tmp_path / "no-such-model", "-o", out) == 2  # the model is never loaded
        err = capsys.readouterr().err.strip()
        assert err.startswith("w2v2 transcribe: error: ") and "would both write talk" in err and "\n" not in err
        assert not out.exists()


def test_too_long_output_name_fails_that_input_only(tiny_model_dir, clips, tmp_path, capsys):
    long = tmp_path / ("x" * 251 + ".wav")  # 255 bytes: fits; "x" * 251 + ".json" does not
    shutil.copy(clips[0], long)
    out = tmp_path / "out"
    assert cli(long, clips[1], "--model", tiny_model_dir, "-f", "json", "-o", out) == 1
    lines = error_lines(capsys)
    assert lines[0].startswith(f"{long}: output name ") and "is too long for the file system (256 bytes)" in lines[0]
    assert lines[1:] == ["1 of 2 input(s) failed"]
    assert os.listdir(out) == [f"{Path(clips[1]).stem}.json"]


def test_names_that_are_not_utf8(tiny_model_dir, clips, tmp_path, capsys):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.wav"
    shutil.copy(clips[0], raw)
    name = os.fsdecode(raw)
    out = tmp_path / "out"
    status = cli(name, "--model", tiny_model_dir, "-f", "all", "-o", out)
    if "surrogates not allowed" in capsys.readouterr().err:
        pytest.skip("the input side does not read files whose name is not UTF-8 yet (issue 15, section 5)")
    assert status == 0
    assert sorted(os.listdir(os.fsencode(out))) == sorted(b"caf\xe9." + f.encode() for f in FORMATS)
    json.loads((out / os.fsdecode(b"caf\xe9.json")).read_bytes().decode("utf-8"))
    assert cli(name, clips[1], "--model", tiny_model_dir) == 0  # headers on standard output
    assert f"==> {tmp_path}/caf\\udce9.wav <==" in capsys.readouterr().out


# ---------------------------------------------------------------------------- streams and leftovers
def test_full_standard_output_is_named_and_stops_the_batch(tiny_model_dir, clips):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "w2v2", "transcribe", *map(str, clips[:2]), "--model",
                               str(tiny_model_dir)], stdout=full, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr
    assert lines[-3:] == [f"{clips[0]}: cannot write to standard output: No space left on device",
                          "stopping: nothing more can be written (No space left on device); 1 input(s) not transcribed",
                          "2 of 2 input(s) failed"]


def test_closed_standard_output_is_one_line_before_any_work(tiny_model_dir, clips):
    """`w2v2 transcribe clip >&-`: Python starts with no sys.stdout at all."""
    proc = subprocess.run(f"'{sys.executable}' -m w2v2 transcribe '{clips[0]}' --model '{tiny_model_dir}' >&-",
                          shell=True, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "w2v2 transcribe: error: cannot write to standard output: it is closed"], proc.stderr


def test_temporaries_of_killed_runs_are_removed_from_the_output_folders(tiny_model_dir, clips, tmp_path):
    from w2v2.fileio import _host

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    tree = tmp_path / "in"
    (tree / "a").mkdir(parents=True)
    shutil.copy(clips[0], tree / "a")
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    stale = [out / f".x.json.0123abcd.{dead}@{_host()}.tmp", out / "a" / f".y.txt.0123abcd.{dead}@{_host()}.tmp"]
    running = out / f".z.txt.0123abcd.1@{_host()}.tmp"  # pid 1 runs
    for p in [*stale, running]:
        p.write_text("half")
    assert cli(tree, "--model", tiny_model_dir, "-o", out) == 0
    assert temporaries(out) == [running]


# ---------------------------------------------------------------------------- for the bad-input corpus
@dataclass(frozen=True)
class OutputCase:
    """A hostile output situation: run ``w2v2 transcribe INPUTS --model M *argv``; it must exit with
    ``status`` and, if ``problem``, print a line containing it; ``outputs`` must then exist."""

    name: str
    argv: list[str]
    status: int
    problem: str | None
    outputs: list[Path] = field(default_factory=list)


def output_cases(folder: Path, audio: Path) -> dict[str, OutputCase]:
    """Output-side cases built in ``folder`` around one good ``audio`` file (needs no mount)."""
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "a-file"
    file.write_text("x")
    blocked = folder / "blocked"
    (blocked / f"{audio.stem}.txt").mkdir(parents=True)
    clash = make_clashing_tree(folder / "dup", audio)
    long = folder / ("y" * 251 + ".wav")
    shutil.copy(audio, long)
    cases = [
        OutputCase("output dir is a file", [str(audio), "-o", str(file)], 2, "is a file, not a folder"),
        OutputCase("output dir below a file", [str(audio), "-o", str(file / "x")], 2, "is a file, not a folder"),
        OutputCase("output is a folder", [str(audio), "-o", str(blocked)], 1, "is a folder; it is not replaced"),
        OutputCase("clashing inputs", [str(clash[0]), str(clash[2]), "-o", str(folder / "o1")], 2, "would both write"),
        OutputCase("mirrored folders", [str(folder / "dup"), "-o", str(folder / "o2")], 0, None,
                   [folder / "o2" / "a" / "talk.flac.txt", folder / "o2" / "a" / "talk.wav.txt",
                    folder / "o2" / "b" / "talk.txt"]),
        OutputCase("output name too long", [str(long), "-f", "json", "-o", str(folder / "o3")], 1, "too long for the file system"),
    ]
    return {c.name: c for c in cases}


def test_output_cases(tiny_model_dir, clips, tmp_path, capsys):
    for case in output_cases(tmp_path, Path(clips[0])).values():
        try:
            status = cli(*case.argv, "--model", tiny_model_dir)
        except SystemExit as e:
            status = e.code
        err = capsys.readouterr().err
        assert status == case.status, (case.name, err)
        assert "Traceback" not in err and "internal error" not in err, (case.name, err)
        if case.problem:
            assert case.problem in err, (case.name, err)
        assert all(p.exists() for p in case.outputs), case.name


# ---------------------------------------------------------------------------- the other commands' outputs
def test_other_commands_refuse_output_paths_that_cannot_work_before_any_work(tiny_model_dir, clips, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("x")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    manifest = tmp_path / "m.tsv"
    manifest.write_text(f"path\tseconds\tspeaker\ttext\n{clips[0]}\t2.0\ts\tHELLO\n")
    text = tmp_path / "text.txt"
    text.write_text("HELLO WORLD\n")
    model = str(tiny_model_dir)
    runs = {  # argv -> the end of its one error line
        ("embed", str(clips[0]), "--model", model, "--output-dir", str(file)): "--output-dir: {file} is a file, not a folder",
        ("embed", str(clips[0]), "--model", model, "--output", str(folder)): "--output: {folder} is a folder, not a file",
        ("embed", str(clips[0]), "--model", model, "--output", str(file / "x")): "--output: {file}/x: {file} is a file, not a folder",
        ("evaluate", "--model", model, "--data", str(manifest), "--out", str(file / "e.tsv")):
            "--out: {file}/e.tsv: {file} is a file, not a folder",
        ("evaluate", "--model", model, "--data", str(manifest), "--out", str(folder)): "--out: {folder} is a folder, not a file",
        ("lm", str(text), str(folder)): "OUT.arpa: {folder} is a folder, not a file",
        ("export", model, str(file)): "out_dir: {file} is a file, not a folder",
        ("probe", "--model", model, "--data", str(manifest), "--split-by", "utterance", "--label-column", "speaker",
         "--json", str(folder)): "--json: {folder} is a folder, not a file",
        ("lm", str(text), str(file / "x.arpa")): "OUT.arpa: {file}/x.arpa: {file} is a file, not a folder",
    }
    for argv, expected in runs.items():
        assert main(list(argv)) == 2, argv
        assert error_lines(capsys) == [f"w2v2 {argv[0]}: error: " + expected.format(file=file, folder=folder)]
    with pytest.raises(SystemExit) as stop:
        main(["align", str(clips[0]), "HELLO", "--model", model, "-o", str(file)])
    assert stop.value.code == 2 and capsys.readouterr().err.strip().endswith(f"{file} is a file, not a folder")
    assert file.read_text() == "x" and os.listdir(folder) == []


def test_embed_disk_full_fails_those_inputs_and_stops(tiny_model_dir, clips, tmp_path, monkeypatch, capsys):
    def no_space(fd):  # where a full disk shows on file systems that allocate late (NFS, delayed allocation)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    out = tmp_path / "emb"
    assert main(["embed", *map(str, clips), "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--no-progress"]) == 1
    lines = error_lines(capsys)
    expected = {f"w2v2 embed: error: {c}: cannot write {out / Path(c).stem}.safetensors: No space left on device"
                for c in clips}  # embedded in order of duration
    assert len(set(lines[:2])) == 2 and set(lines[:2]) <= expected
    assert lines[2:] == ["w2v2 embed: stopping: nothing more can be written (No space left on device)",
                         "0 of 3 files embedded to " + str(out) + "; 3 failed (see above)"]


def test_lm_on_a_full_device_is_one_line(tmp_path, capsys):
    full = tmp_path / "full"
    try:
        os.mknod(full, 0o666 | 0o020000, os.makedev(1, 7))  # a private /dev/full
    except PermissionError as e:
        pytest.skip(f"cannot make device nodes here: {e}")
    text = tmp_path / "text.txt"
    text.write_text("HELLO WORLD\n" * 1000)
    assert main(["lm", str(text), str(full)]) == 1
    assert error_lines(capsys) == [f"w2v2 lm: error: cannot write {full}: No space left on device"]
    assert not full.is_file()


# ---------------------------------------------------------------------------- random layouts
@pytest.fixture(scope="module")
def one_second(clips, tmp_path_factory):
    """One second of real speech, as float32 samples (written as each example's inputs)."""
    audio, sr = sf.read(clips[0], dtype="float32")
    return audio[:sr], sr


OBSTACLES = [None, "an output is a folder", "-o is a file", "-o is below a file", "a subfolder is a file"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["", "a", "a/b"]), st.sampled_from(["talk", "Talk", "x" * 200]),
                                st.sampled_from([".wav", ".flac"])), min_size=1, max_size=4, unique=True),
       as_folder=st.booleans(), fmt=st.sampled_from(["txt", "json", "all"]), obstacle=st.sampled_from(OBSTACLES))
def test_random_layouts_lose_no_transcript(tiny_model_dir, one_second, files, as_folder, fmt, obstacle, capsys):
    """Random input trees, given as one folder or as files, with an obstacle on the output side:
    exit 0, 1 or 2, never an internal error; refused (2): nothing written; else every input has
    all its formats under its own name or one line naming it, and no temporary is left."""
    root = Path(tempfile.mkdtemp(prefix="w2v2-layout-"))
    try:
        inputs = []
        for folder, stem, ext in files:
            path = root / "in" / folder / f"{stem}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, *one_second)
            inputs.append(path)
        out, placed = root / "out", False
        if obstacle == "-o is a file":
            out.write_text("x")
        elif obstacle == "-o is below a file":
            (root / "file").write_text("x")
            out = root / "file" / "out"
        elif obstacle == "an output is a folder":  # where the first input's output goes, if the names do not clash
            with contextlib.suppress(ValueError):
                name = output_names([(os.fspath(p), os.fspath(root / "in") if as_folder else None) for p in inputs])[0]
                (out / f"{name}.{'txt' if fmt == 'all' else fmt}").mkdir(parents=True)
                placed = True
        elif obstacle == "a subfolder is a file":
            out.mkdir()
            (out / "a").write_text("x")
        before = sorted(p for p in root.rglob("*") if p.is_file())
        argv = [root / "in"] if as_folder else inputs
        try:
            status = cli(*argv, "--model", tiny_model_dir, "-f", fmt, "-o", out)
        except SystemExit as e:  # argparse: -o cannot be a folder
            status = e.code
        err = capsys.readouterr().err
        assert status in (0, 1, 2) and "internal error" not in err and "Traceback" not in err, err
        written = sorted(p for p in root.rglob("*") if p.is_file() and p not in before)
        assert not [p for p in written if p.name.endswith(".tmp")], written
        if status == 2:
            assert written == [], err
            return
        per_input = len(FORMATS) if fmt == "all" else 1
        failed = [p for p in inputs if any(line.startswith(f"{p}: ") for line in err.splitlines())]
        assert len(written) == per_input * (len(inputs) - len(failed)), (err, written)
        assert status == (1 if failed else 0), err
        in_a = as_folder and any(folder.startswith("a") for folder, _, _ in files)  # mirrored below out/a
        if obstacle == "an output is a folder" and placed or obstacle == "a subfolder is a file" and in_a:
            assert failed, err
    finally:
        shutil.rmtree(root, ignore_errors=True)

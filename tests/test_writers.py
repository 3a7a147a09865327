"""Output writers on a small hand-made result, and atomic file writes."""

import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from w2v2.fileio import (STALE_AFTER_SECONDS, atomic_open, atomic_write_bytes, atomic_write_text,
                         remove_stale_temporaries)
from w2v2.writers import WRITERS, format_timestamp, get_writer, output_stem


def word(w, start, end, confidence=0.9):
    return {"word": w, "start": start, "end": end, "confidence": confidence}


@pytest.fixture
def result():
    segments = [
        {"start": 0.0, "end": 1.5, "text": "héllo wörld", "words": [word("héllo", 0.0, 0.6), word("wörld", 0.8, 1.5)]},
        {"start": 61.25, "end": 3725.007, "text": "second\tline\nhere", "words": [word("second", 61.25, 62.0)]},
    ]
    return {
        "text": "héllo wörld second line here",
        "segments": segments,
        "words": [w for s in segments for w in s["words"]],
        "language": "en",
        "metadata": {"model": "tiny-test", "options": {"beam_size": 1}},
    }


TIME = r"(\d\d):(\d\d):(\d\d)[,.](\d\d\d)"


def parse_cues(text: str, marker: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of every cue in SRT/VTT text."""
    cues = []
    for block in text.strip().split("\n\n"):
        lines = block.split("\n")
        i = next(k for k, line in enumerate(lines) if "-->" in line)
        start, end = lines[i].split(" --> ")
        assert marker in start and marker in end
        cues.append((to_seconds(start), to_seconds(end), "\n".join(lines[i + 1:])))
    return cues


def to_seconds(stamp: str) -> float:
    h, m, s, ms = map(int, re.fullmatch(TIME, stamp).groups())
    return h * 3600 + m * 60 + s + ms / 1000


def test_format_timestamp():
    assert format_timestamp(1.5, ",") == "00:00:01,500"
    assert format_timestamp(1.5) == "00:00:01.500"
    assert format_timestamp(3725.0074) == "01:02:05.007"
    assert format_timestamp(59.9996) == "00:01:00.000"
    with pytest.raises(ValueError):
        format_timestamp(-1)


@pytest.mark.parametrize("fmt,marker", [("srt", ","), ("vtt", ".")])
def test_subtitles_parse_back(fmt, marker, result, tmp_path):
    path = get_writer(fmt, tmp_path)(result, "/some/where/clip.opus")
    assert path == tmp_path / f"clip.{fmt}"
    text = path.read_text(encoding="utf-8")
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n")
        text = text[len("WEBVTT\n\n"):]
    else:
        assert [b.split("\n")[0] for b in text.strip().split("\n\n")] == ["1", "2"]
    cues = parse_cues(text, marker)
    assert cues == [(0.0, 1.5, "héllo wörld"), (61.25, 3725.007, "second line here")]


def test_txt(result, tmp_path):
    path = get_writer("txt", tmp_path)(result, "clip.wav")
    assert path.read_text(encoding="utf-8") == "héllo wörld\nsecond\tline\nhere\n"
    path = get_writer("txt", tmp_path)({"text": " just text ", "segments": []}, "other.wav")
    assert path.read_text(encoding="utf-8") == "just text\n"


def test_tsv(result, tmp_path):
    rows = get_writer("tsv", tmp_path)(result, "clip.wav").read_text(encoding="utf-8").splitlines()
    assert rows == ["start_ms\tend_ms\ttext", "0\t1500\théllo wörld", "61250\t3725007\tsecond line here"]


def test_json_roundtrip_keeps_unicode(result, tmp_path):
    result["metadata"]["numpy"] = np.float32(0.5)
    path = get_writer("json", tmp_path)(result, "clip.wav")
    raw = path.read_bytes().decode("utf-8")
    assert "héllo" in raw
    loaded = json.loads(raw)
    assert loaded.pop("metadata")["numpy"] == 0.5
    result.pop("metadata")
    assert loaded == result


def test_all_and_stdin_name(result, tmp_path):
    paths = get_writer("all", tmp_path / "out")(result, "-")
    assert sorted(p.name for p in paths) == sorted(f"stdin.{ext}" for ext in WRITERS)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(p.name for p in paths)


def test_output_stem():
    assert output_stem("-") == "stdin"
    assert output_stem("a/b/talk.final.mp4") == "talk.final"


def test_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="unknown output format 'doc'.*srt"):
        get_writer("doc", tmp_path)


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "ñew\r\n")
    assert path.read_bytes() == "ñew\r\n".encode()
    atomic_write_bytes(tmp_path / "b.bin", b"\0\1")
    assert (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "f.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failure_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "complete old content")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("partial new")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "complete old content"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_writer_failing_mid_way_leaves_nothing(result, tmp_path):
    result["segments"].append({"start": 4.0, "end": 5.0})  # no "text": TSV raises after writing two rows
    with pytest.raises(KeyError):
        get_writer("tsv", tmp_path)(result, "clip.wav")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------- stale temporaries
WRITER_THEN_SLEEP = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fileio", sys.argv[2])  # alone: without torch, it starts at once
fileio = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fileio)
with fileio.atomic_open(sys.argv[1]) as f:
    f.write("half")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_writers_temporary_is_removed_but_not_a_running_ones(tmp_path):
    target = tmp_path / "talk.json"
    import w2v2.fileio

    writers = [subprocess.Popen([sys.executable, "-c", WRITER_THEN_SLEEP, str(target), w2v2.fileio.__file__],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for w in writers:
            assert w.stdout.readline() == "writing\n"
        temps = sorted(p.name for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(t.startswith(".talk.json.") and t.endswith(".tmp") for t in temps)
        assert remove_stale_temporaries(tmp_path) == []  # both writers run
        writers[0].kill()
        writers[0].wait()
        removed = remove_stale_temporaries(tmp_path)
        assert [p.name for p in removed] == [t for t in temps if f".{writers[0].pid}@" in t]
        assert [p.name for p in tmp_path.iterdir()] == [t for t in temps if f".{writers[1].pid}@" in t]
    finally:
        for w in writers:
            w.kill()
            w.wait()


def test_stale_temporaries_of_other_hosts_and_older_versions_go_by_age(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    from w2v2.fileio import _host

    names = {
        f".a.txt.abcd_123.{dead}@{_host()}.tmp": True,  # this host, writer gone
        f".a.txt.abcd_124.{os.getpid()}@{_host()}.tmp": False,  # this process
        f".a.txt.abcd_125.{dead}@elsewhere-{_host()}.tmp": False,  # another host, recent
        ".a.txt.abcd_126.tmp": False,  # an older version's, recent
        ".notes.tmp": False,  # not a name atomic_open makes
        "a.txt.abcd_127.tmp": False,  # not hidden
    }
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / "b.txt").write_text("x")
    old = {f".b.txt.abcd_128.{dead}@elsewhere.tmp": True, ".b.txt.abcd_129.tmp": True, ".old.tmp": False,
           ".c.txt.abcd_132.tmp": False}  # an older version's pattern, but no c.txt: maybe not ours
    for name in old:
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (0, time.time() - STALE_AFTER_SECONDS - 60))
    (tmp_path / f".c.txt.abcd_130.{dead}@{_host()}.tmp").mkdir()  # a directory: not ours
    os.symlink("a.txt", tmp_path / f".d.txt.abcd_131.{dead}@{_host()}.tmp")  # a link: not ours
    removed = {p.name for p in remove_stale_temporaries(tmp_path)}
    assert removed == {n for n, stale in {**names, **old}.items() if stale}
    assert all(not (tmp_path / n).exists() for n in removed)
    assert len(os.listdir(tmp_path)) == len(names) + len(old) + 3 - len(removed)
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_long_target_names_get_a_temporary_that_fits(tmp_path):
    name = "é" * 120 + ".json"  # 245 bytes: the target fits NAME_MAX, its name plus a suffix would not
    atomic_write_text(tmp_path / name, "{}")
    assert os.listdir(tmp_path) == [name]


# ---------------------------------------------------------------------------- several files, all or nothing
def test_write_outputs_is_all_or_nothing_when_a_write_fails(result, tmp_path, monkeypatch):
    from w2v2.fileio import OutputError
    from w2v2.writers import WriteTSV, write_outputs

    for fmt in WRITERS:
        (tmp_path / f"clip.{fmt}").write_text("old")

    def disk_full(self, result, file):
        file.write("start")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WriteTSV, "write_result", disk_full)  # after txt, srt, vtt and json are staged
    with pytest.raises(OutputError) as e:
        write_outputs(result, tmp_path, "clip", list(WRITERS))
    assert str(e.value) == f"cannot write {tmp_path / 'clip.tsv'}: No space left on device" and e.value.errno == 28
    assert sorted(os.listdir(tmp_path)) == [f"clip.{fmt}" for fmt in sorted(WRITERS)]
    assert all((tmp_path / f"clip.{fmt}").read_text() == "old" for fmt in WRITERS)


def test_a_failed_rename_puts_the_renamed_files_back(tmp_path, monkeypatch):
    from w2v2.fileio import OutputError, atomic_write_files

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").mkdir()  # a folder where the third file goes: its rename fails
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(tmp_path / 'c.txt'))}: Is a directory"):
        atomic_write_files({tmp_path / n: (lambda f, n=n: f.write(f"new {n}")) for n in ["a.txt", "b.txt", "c.txt"]})
    assert (tmp_path / "a.txt").read_text() == "old a"  # renamed, then put back
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.txt"]  # b.txt did not exist before: removed again
    atomic_write_files({tmp_path / n: (lambda f, n=n: f.write(f"new {n}")) for n in ["a.txt", "b.txt"]})
    assert [(tmp_path / n).read_text() for n in ["a.txt", "b.txt"]] == ["new a.txt", "new b.txt"]


def test_creation_errors_name_the_folder_and_write_errors_the_file(tmp_path, monkeypatch):
    from w2v2.fileio import OutputError, make_folder

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OutputError) as e:
        atomic_write_text(tmp_path / "t.txt", "x")
    assert str(e.value) == f"cannot create t.txt in {tmp_path}: Read-only file system"  # not the temporary's name
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=f"cannot create the folder .*: {re.escape(str(tmp_path / 'file'))} is a file"):
        make_folder(tmp_path / "file" / "sub" / "subsub")


def test_names_that_are_not_utf8_round_trip(result, tmp_path):
    from w2v2.writers import write_outputs

    name = os.fsdecode(b"caf\xe9")
    result["metadata"]["model"] = os.fsdecode(b"/models/\xff")  # a model path that is not UTF-8 either
    write_outputs(result, tmp_path, name, list(WRITERS))
    assert sorted(os.listdir(os.fsencode(tmp_path))) == sorted(b"caf\xe9." + f.encode() for f in WRITERS)
    back = json.loads((tmp_path / f"{name}.json").read_bytes().decode("utf-8"))  # valid UTF-8 JSON
    assert back["metadata"]["model"] == result["metadata"]["model"]


def test_output_names_mirror_folders_and_keep_extensions_only_on_a_clash():
    from w2v2.writers import output_names

    assert output_names([("in/a/talk.flac", "in"), ("in/a/talk.wav", "in"), ("in/b/talk.flac", "in"),
                         ("x/solo.mp3", None), ("-", None)]) == ["a/talk.flac", "a/talk.wav", "b/talk", "solo", "stdin"]
    assert output_names([("x/talk.flac", None), ("y/talk.wav", None)]) == ["talk.flac", "talk.wav"]
    with pytest.raises(ValueError, match="x/talk.flac and y/talk.flac would both write talk.flac.*"):
        output_names([("x/talk.flac", None), ("y/talk.flac", None)])


# ---------------------------------------------------------------------------- subtitle cues
def seg(text, start, end):
    return {"start": start, "end": end, "text": text}


def check_cues(cues: list[tuple[float, float, str]], segments: list[dict], duration: float | None) -> None:
    """What every subtitle file must satisfy, whatever the words: the segments' text in order, each
    cue covering its segments, no overlap, inside the audio, lines of at most 42 characters, and
    no cue under a second unless its neighbours (or the audio's ends) leave no room."""
    from w2v2.decoding.segments import MAX_LINE_CHARS, MIN_CUE_SECONDS

    spoken = [s for s in segments if s["text"].strip()]
    assert " ".join(c[2].replace("\n", " ") for c in cues).split() == " ".join(s["text"] for s in spoken).split()
    i = 0
    for k, (start, end, text) in enumerate(cues):
        n = len(text.split())  # the segments this cue shows
        covered = []
        while n > 0:
            covered.append(spoken[i])
            n -= len(spoken[i]["text"].split())
            i += 1
        assert n == 0, "a cue holds part of a segment"
        assert start <= covered[0]["start"] + 5e-4 and end >= covered[-1]["end"] - 5e-4
        assert all(len(line) <= MAX_LINE_CHARS or " " not in line for line in text.split("\n"))
        earlier = cues[k - 1][1] if k else 0.0
        later = cues[k + 1][0] if k + 1 < len(cues) else duration
        assert earlier <= start < end and (later is None or end <= later + 5e-4)
        if end - start < MIN_CUE_SECONDS - 5e-4:  # short only when boxed in
            assert start <= earlier + 5e-4 and later is not None and end >= later - 5e-4, (start, end, earlier, later)


def cues_of(segments, duration=None, fmt="srt"):
    result = {"text": "", "segments": segments, "metadata": {"duration": duration}}
    text = io.StringIO()
    WRITERS[fmt](".").write_result(result, text)
    return parse_cues(text.getvalue().removeprefix("WEBVTT\n\n"), "," if fmt == "srt" else ".")


def test_a_flash_of_one_letter_joins_the_nearer_neighbour():
    segments = [seg("GOOD MORNING", 0.0, 1.5), seg("O", 2.1, 2.12), seg("HOW ARE YOU", 2.9, 4.0)]
    assert cues_of(segments, 5.0) == [(0.0, 2.12, "GOOD MORNING O"), (2.9, 4.0, "HOW ARE YOU")]
    segments[1] = seg("O", 2.8, 2.82)  # nearer the next one now
    assert cues_of(segments, 5.0) == [(0.0, 1.5, "GOOD MORNING"), (2.8, 4.0, "O HOW ARE YOU")]


def test_a_short_cue_alone_is_shown_for_a_second_without_overlapping():
    far = [seg("HELLO THERE", 0.0, 2.0), seg("E", 4.0, 4.02), seg("AND THEN SOME", 6.0, 8.0)]
    assert cues_of(far, 9.0) == [(0.0, 2.0, "HELLO THERE"), (4.0, 5.0, "E"), (6.0, 8.0, "AND THEN SOME")]
    # too long to join (7 s at most): the end moves to the next cue, the start back to a second
    boxed = [seg("A " * 10, 0.0, 6.5), seg("E", 7.0, 7.02), seg("B " * 10, 7.6, 14.5)]
    cues = cues_of(boxed, 15.0, fmt="vtt")
    assert [c[:2] for c in cues] == [(0.0, 6.5), (6.6, 7.6), (7.6, 14.5)]
    check_cues(cues, boxed, 15.0)
    # at the end of the audio: never past it
    assert cues_of([seg("OK", 2.0, 2.3)], 2.5)[0][:2] == (1.5, 2.5)


def test_lines_are_42_characters_at_most_and_balanced():
    text = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG WHILE THE CAT IS AWAY AT SEA"  # 72 characters
    (_, _, shown), = cues_of([seg(text, 0.0, 4.0)])
    lines = shown.split("\n")
    assert len(lines) == 2 and max(map(len, lines)) <= 42 and abs(len(lines[0]) - len(lines[1])) <= 10
    assert " ".join(lines) == text
    long_word = "X" * 50
    assert cues_of([seg(f"A {long_word} B", 0.0, 3.0)])[0][2].split("\n") == ["A", long_word, "B"]


def test_cue_rules_hold_for_random_word_timings():
    """Crafted timings: words of 20 ms to 1 s, pauses of 0 to 3 s, grouped by ``segment_words``."""
    from w2v2.decoding import segment_words
    from w2v2.decoding.types import Word

    for trial in range(200):
        rng = np.random.default_rng(trial)
        t, words = float(rng.uniform(0, 2)), []
        for _ in range(int(rng.integers(1, 60))):
            length = float(rng.choice([0.02, 0.04, rng.uniform(0.02, 1.0)]))
            words.append(Word("".join(rng.choice(list("AEIOUTHNS"), int(rng.integers(1, 12)))), round(t, 2),
                              round(t + length, 2), 1.0))
            t += length + float(rng.choice([0.0, rng.uniform(0.0, 3.0)]))
        segments = segment_words(words, max_chars=int(rng.integers(10, 120)))
        duration = round(t + float(rng.uniform(0, 1)), 2)
        check_cues(cues_of(segments, duration, fmt=["srt", "vtt"][trial % 2]), segments, duration)


def test_streams_are_written_in_place_and_links_followed(tmp_path):
    """An output on a character device or a FIFO is written to it, never replaced by a file (as
    root, that replaced /dev/full for everyone); a link keeps pointing where it did. The devices
    are private nodes (mknod needs root), so a regression breaks nothing outside tmp_path."""
    import threading

    from w2v2.fileio import OutputError

    try:
        os.mknod(tmp_path / "null", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(tmp_path / "full", 0o666 | 0o020000, os.makedev(1, 7))
    except (PermissionError, AttributeError) as e:
        pytest.skip(f"cannot make device nodes here: {e}")
    atomic_write_text(tmp_path / "null", "gone")
    with pytest.raises(OutputError, match=f"cannot write {re.escape(str(tmp_path / 'full'))}: No space left on device"):
        atomic_write_bytes(tmp_path / "full", b"x" * 10000)
    assert all(os.path.exists(tmp_path / n) and not (tmp_path / n).is_file() for n in ("null", "full"))
    os.mkfifo(tmp_path / "fifo")
    got = []
    reader = threading.Thread(target=lambda: got.append((tmp_path / "fifo").read_text()))
    reader.start()
    atomic_write_text(tmp_path / "fifo", "through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"] and not (tmp_path / "fifo").is_file()
    (tmp_path / "real.txt").write_text("old")
    os.symlink("real.txt", tmp_path / "link.txt")
    atomic_write_text(tmp_path / "link.txt", "new")
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "real.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["fifo", "full", "link.txt", "null", "real.txt"]

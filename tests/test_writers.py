"""Output writers on a small hand-made result, and atomic file writes."""

import json
import os
import re

import numpy as np
import pytest

from w2v2.fileio import atomic_open, atomic_write_bytes, atomic_write_text
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

"""Bad manifests, configs and options are reported before training, all at once, and write nothing.

``w2v2 pretrain`` and ``w2v2 finetune`` must list every problem of every manifest and of the
configuration in one error (one line each), exit 1 without a traceback, and leave no run
directory behind. Audio files that are missing or unreadable are listed up front and skipped.
"""

from __future__ import annotations

import json
import math

import pytest

from w2v2 import data, pretrain
from w2v2.cli import main
from w2v2.config import ConfigError, check_fields
from w2v2.trainer import TrainConfig

from .helpers import write_clips


@pytest.fixture
def clips(tmp_path):
    write_clips(tmp_path / "set", [0.6, 0.7, 0.8])
    return tmp_path / "set"


def bad_manifest(folder, name="bad.tsv"):
    """A manifest with five bad lines among good ones (and a blank line, which is skipped)."""
    rows = ["path\tseconds\tspeaker\ttext",
            "set/audio/clip000.wav\t0.6\ts\tA",  # 2: fine
            "set/audio/clip001.wav\tlong\ts\tB",  # 3: not a number
            "set/audio/clip001.wav\t-3\ts\tB",  # 4: negative
            "",  # 5: blank
            "set/audio/clip002.wav\tnan\ts\tC",  # 6: not finite
            "set/audio/clip002.wav\t0.8\ts\tC\tspilled text",  # 7: a tab inside the text
            "\t0.8\ts\tD",  # 8: empty path
            "set/audio/clip002.wav\t0.8"]  # 9: fields missing
    path = folder / name
    path.write_text("\n".join(rows) + "\n")
    return path


def error_lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------- manifests
def test_every_bad_line_of_every_manifest_is_listed(tmp_path, clips):
    bad = bad_manifest(tmp_path)
    (tmp_path / "nocol.tsv").write_text("file\tseconds\nx.wav\t1\n")
    (tmp_path / "binary.tsv").write_bytes(b"path\tseconds\n\xff\xfe\x00garbage\n")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(data.ManifestError) as info:
        data.list_entries([bad, tmp_path / "nocol.tsv", tmp_path / "binary.tsv", tmp_path / "missing.tsv",
                           tmp_path / "empty_dir", clips])
    problems = info.value.problems
    assert problems[:6] == [
        f"{bad}:3: seconds must be a number, got 'long'",
        f"{bad}:4: seconds must be a non-negative number, got '-3'",
        f"{bad}:6: seconds must be a non-negative number, got 'nan'",
        f"{bad}:7: 5 tab-separated fields, the header has 4",
        f"{bad}:8: empty path",
        f"{bad}:9: 2 tab-separated fields, the header has 4",
    ]
    assert "nocol.tsv: a manifest needs a tab-separated header with a 'path' column" in problems[6]
    assert "binary.tsv: not UTF-8 text" in problems[7]
    assert problems[8:] == [f"{tmp_path / 'missing.tsv'}: no such manifest",
                            f"{tmp_path / 'empty_dir'}: no audio files found in this folder"]
    message = str(info.value)
    assert message.startswith("10 problems:\n") and all(p in message for p in problems)


def test_transcripts_required_for_fine_tuning(tmp_path, clips):
    (tmp_path / "notext.tsv").write_text("path\tseconds\nset/audio/clip000.wav\t0.6\n")
    assert data.list_entries([tmp_path / "notext.tsv"])[0].text is None  # fine for pretraining
    with pytest.raises(data.ManifestError) as info:
        data.list_entries([tmp_path / "notext.tsv", clips / "audio", clips / "manifest.tsv"], require_text=True)
    assert len(info.value.problems) == 2
    assert "notext.tsv: no 'text' column" in info.value.problems[0]
    assert "audio: not a manifest with transcripts" in info.value.problems[1]


# ---------------------------------------------------------------------------- configs
def test_config_problems_are_listed_together():
    with pytest.raises(ConfigError) as info:
        pretrain.preset_config("tiny", {"train": {"lr": "fast", "warmup": 3, "save_interval": 0},
                                        "loss": {"mask_prob": 1.5, "negatives": 3}, "data": {"max_tokens": 0},
                                        "model": {"hidden_size": 33.5}, "optim": {}})
    problems = info.value.problems
    expected = ["train: unknown TrainConfig options ['warmup'] (did you mean: warmup -> warmup_updates?)",
                "train.lr: expected a number, got 'fast'",
                "loss: unknown PretrainingLossConfig options ['negatives'] (did you mean: negatives -> num_negatives?)",
                "model.hidden_size: expected an integer, got 33.5",
                "unknown section 'optim' in the pretraining config; use model, train, loss, data"]
    assert all(e in problems for e in expected), problems
    # the options that pass the type checks are range-checked too
    assert "loss: mask_prob must lie in [0, 1], got 1.5" in problems
    assert "train: save_interval and log_interval must be >= 1, got 0 and 10" in problems
    assert any(p.startswith("data: max_tokens and max_samples must be >= 1") for p in problems)
    assert len(problems) == 8


def test_check_fields_types():
    good = {"lr": 1, "betas": [0.9, 0.98], "max_epochs": None, "tri_stage_ratios": (0.1, 0.4, 0.5), "progress": False}
    assert check_fields(TrainConfig, good, "train") == []
    bad = {"lr": math.nan, "betas": [0.9], "max_epochs": 1.0, "progress": 0, "precision": 16}
    assert [p.split(":")[0] for p in check_fields(TrainConfig, bad, "train")] == [
        "train.lr", "train.betas", "train.max_epochs", "train.progress", "train.precision"]
    assert check_fields(TrainConfig, ["lr"], "train") == ["train: expected an object of TrainConfig options, "
                                                          "got ['lr']"]


def test_run_config_file_round_trip_still_loads(tmp_path):
    cfg = pretrain.preset_config("small", {"train": {"max_epochs": 3}})
    path = tmp_path / "r.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert pretrain.load_run_config(path).to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------- the commands
def test_pretrain_lists_config_and_manifest_problems_and_writes_nothing(tmp_path, clips, capsys):
    bad = bad_manifest(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"train": {"lr": "fast"}, "loss": {"negatives": 3}}))
    run = tmp_path / "run"
    rc = main(["pretrain", str(bad), str(tmp_path / "missing.tsv"), "--out", str(run), "--preset", "tiny",
               "--config", str(config), "--max-updates", "-1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and not run.exists()
    lines = error_lines(err)
    assert lines[0] == "w2v2 pretrain: error: 10 problems:"
    assert lines[1:4] == ["train.lr: expected a number, got 'fast'",
                          "loss: unknown PretrainingLossConfig options ['negatives'] (did you mean: negatives -> num_negatives?)",
                          "train: accum_steps must be >= 1 and max_updates >= 0"]
    assert sum(line.startswith(f"{bad}:") for line in lines) == 6
    assert lines[-1] == f"{tmp_path / 'missing.tsv'}: no such manifest"


def test_pretrain_invalid_json_and_flag_values(tmp_path, clips, capsys):
    run = tmp_path / "run"
    config = tmp_path / "config.json"
    config.write_text('{"train": {"lr": 1e-3,}}')
    assert main(["pretrain", str(clips), "--out", str(run), "--preset", "tiny", "--config", str(config)]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"w2v2 pretrain: error: {config}:1:23: invalid JSON: Expecting property name enclosed in double quotes"]
    assert main(["pretrain", str(clips), "--out", str(run), "--preset", "tiny", "--save-interval", "0",
                 "--max-tokens", "0"]) == 1
    err = capsys.readouterr().err
    assert "2 problems" in err and "save_interval and log_interval must be >= 1" in err and "max_tokens" in err
    assert main(["pretrain", str(clips), "--out", str(run), "--preset", "tiny", "--config", str(tmp_path / "no.json")]) == 1
    assert f"{tmp_path / 'no.json'}: no such config file" in capsys.readouterr().err
    assert not run.exists()


def test_pretrain_lists_unusable_audio_up_front_and_fails_when_none_is_left(tmp_path, capsys):
    (tmp_path / "m.tsv").write_text("path\nnope1.wav\nnope2.wav\njunk.wav\n")
    (tmp_path / "junk.wav").write_text("not audio " * 10)
    run = tmp_path / "run"
    assert main(["pretrain", str(tmp_path / "m.tsv"), "--out", str(run), "--preset", "tiny", "--no-progress"]) == 1
    err = capsys.readouterr().err
    for name, reason in (("nope1.wav", "no such file"), ("nope2.wav", "no such file"), ("junk.wav", "not an audio")):
        assert f"skipping {tmp_path / name}: {reason}" in err
    assert "no usable audio" in err and "Traceback" not in err and not run.exists()


def test_pretrain_refuses_to_overwrite_a_run(tmp_path, clips, capsys):
    run = tmp_path / "run"
    (run / "checkpoint_0000010").mkdir(parents=True)
    assert main(["pretrain", str(clips), "--out", str(run), "--preset", "tiny"]) == 1
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["checkpoint_0000010"]


def test_finetune_lists_every_problem_and_writes_nothing(tmp_path, clips, capsys):
    (tmp_path / "notext.tsv").write_text("path\tseconds\nset/audio/clip000.wav\t0.6\n")
    bad = bad_manifest(tmp_path)
    run = tmp_path / "run"
    rc = main(["finetune", "--init", "random:huge", "--train", str(tmp_path / "notext.tsv"), "--valid", str(bad),
               "--out", str(run), "--max-updates", "-1", "--valid-interval", "0"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and not run.exists()
    lines = error_lines(err)
    assert lines[0] == "w2v2 finetune: error: 10 problems:"
    assert lines[1:3] == ["valid_interval must be >= 1, got 0", "accum_steps must be >= 1 and max_updates >= 0"]
    assert lines[3].startswith("--init random:huge: unknown preset")
    assert "notext.tsv: no 'text' column" in lines[4]
    assert sum(line.startswith(f"{bad}:") for line in lines) == 6


def test_finetune_without_usable_audio_writes_nothing(tmp_path, capsys):
    (tmp_path / "m.tsv").write_text("path\ttext\nnope.wav\tHELLO\n")
    run = tmp_path / "run"
    assert main(["finetune", "--init", "random:tiny", "--train", str(tmp_path / "m.tsv"), "--valid",
                 str(tmp_path / "m.tsv"), "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert "no usable audio" in err and "Traceback" not in err and not run.exists()


def test_evaluate_checks_every_manifest_before_loading_the_model(tmp_path, clips, capsys):
    """A header-only manifest, a missing one and one whose transcripts are all empty: one error
    listing the three, exit 1, and the model (which does not exist) is never opened."""
    (tmp_path / "header.tsv").write_text("path\ttext\n")
    (tmp_path / "blank.tsv").write_text("path\ttext\nset/audio/clip000.wav\t\nset/audio/clip001.wav\t...\n")
    rc = main(["evaluate", "--model", str(tmp_path / "no-model"), "--device", "cpu",
               "--data", str(tmp_path / "header.tsv"), str(tmp_path / "missing.tsv"), str(tmp_path / "blank.tsv")])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "no-model" not in err
    assert error_lines(err)[-4:] == [
        "w2v2 evaluate: error: 3 problems:",
        f"{tmp_path / 'header.tsv'}: no rows (the manifest holds only its header)",
        f"{tmp_path / 'missing.tsv'}: no such manifest",
        f"{tmp_path / 'blank.tsv'}: no utterance to score (none of 2 has a transcript)"]


def test_evaluate_reports_utterances_without_transcripts_as_excluded(tmp_path, clips, capsys, caplog):
    """Empty references are left out of WER/CER with a warning each (they gave WER 3800%)."""
    from tests.conftest import tiny_ctc_model
    from w2v2.checkpoint import save_pretrained

    model = save_pretrained(tiny_ctc_model(["ABC "]), tmp_path / "model")
    m = tmp_path / "m.tsv"
    m.write_text("path\ttext\nset/audio/clip000.wav\tA B\nset/audio/clip001.wav\t \nset/audio/clip002.wav\t\"\"\n")
    assert main(["evaluate", "--model", str(model), "--device", "cpu", "--data", str(m)]) == 0
    out, err = capsys.readouterr().out, caplog.text
    for name in ("clip001.wav", "clip002.wav"):
        assert (f"{m}: excluding {tmp_path / 'set' / 'audio' / name}: no transcript to score against (the text is "
                "empty after normalisation)") in err
    assert f"{m}: 2 of 3 utterances excluded; WER and CER are over the other 1" in err
    row = out.splitlines()[-1].split()
    assert row[2:4] == ["1", "2"]  # utterances, reference words


def test_training_refuses_pipes_and_devices_in_manifests(tmp_path, clips, capsys):
    """A named pipe or device in a training manifest is listed as unusable, never opened (it
    would be read once, then hang or read nothing): no writer is needed for this test to end."""
    import os

    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "m.tsv").write_text(f"path\npipe.wav\n{os.devnull}\nset/audio/clip000.wav\n")
    good, bad = data.validate_entries(data.list_entries([tmp_path / "m.tsv"]))
    assert [os.path.basename(e.path) for e in good] == ["clip000.wav"]
    assert [(os.path.basename(e.path), r) for e, r in bad] == [
        (name, "a named pipe or device, not a regular file (training data is read many times)")
        for name in ("pipe.wav", "null")]

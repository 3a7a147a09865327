"""Loading a model from hostile or broken files: one line naming the file and the cause, exit 1,
no traceback, no hang, and memory bounded by the files' sizes, never by what they claim."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import w2v2
from w2v2 import checkpoint, config
from w2v2.checkpoint import CheckpointError
from w2v2.cli import main
from w2v2.vocab import Vocabulary

from .test_checkpoint import fairseq_checkpoint, to_fairseq

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary(("<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C"))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny CTC model in Hugging Face layout (what w2v2 writes)."""
    torch.manual_seed(0)
    w2v2.save_pretrained(w2v2.build_model(config.tiny(), vocab=VOCAB), tmp_path / "m")
    return tmp_path / "m"


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def refused(source, match: str) -> str:
    """The error of loading ``source``: a ValueError (CheckpointError or ConversionError) of one
    line, matching ``match``."""
    with pytest.raises(ValueError, match=match) as e:
        w2v2.load_model(source)
    assert "\n" not in str(e.value), str(e.value)
    assert "weights_only=False" not in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------- config values
CONFIG_CASES = {
    "a list": ([1, 2, 3], r"config\.json: expected a JSON object of model options, got list"),
    "hidden_size a string": ({"hidden_size": "lots"}, r"config\.json: hidden_size: expected an integer, got 'lots'"),
    "hidden_size a float": ({"hidden_size": 1e9}, r"config\.json: hidden_size: expected an integer"),
    "no heads": ({"num_attention_heads": 0}, r"config\.json: num_attention_heads must be 1\.\.\d+, got 0"),
    "stride 0": ({"conv_stride": [5, 0, 2, 2, 2, 2, 2]}, r"config\.json: conv_stride entries must be 1\.\."),
    "kernel -3": ({"conv_kernel": [10, -3, 3, 3, 3, 2, 2]}, r"config\.json: conv_kernel entries must be"),
    "layers -1": ({"num_hidden_layers": -1}, r"config\.json: num_hidden_layers must be 0\.\.\d+, got -1"),
    "layers 0": ({"num_hidden_layers": 0}, r"the config asks for 0 Transformer layers but the weights hold 2"),
    "layers true": ({"num_hidden_layers": True}, r"config\.json: num_hidden_layers: expected an integer, got True"),
    "a million layers": ({"num_hidden_layers": 1_000_000}, r"config\.json: num_hidden_layers must be 0\.\.1024"),
    "huge ffn": ({"intermediate_size": 10_000_000}, r"config\.json: intermediate_size must be 1\.\."),
    "heads do not divide": ({"num_attention_heads": 3}, r"config\.json: hidden_size 32 is not divisible by "
                                                        r"num_attention_heads 3"),
    "pos groups do not divide": ({"num_conv_pos_embedding_groups": 5}, r"not divisible by num_conv_pos_embedding"),
    "lists of unequal length": ({"conv_dim": [32, 32]}, r"conv_dim, conv_kernel and conv_stride must have the same "
                                                        r"length"),
    "conv_bias a string": ({"conv_bias": "yes"}, r"config\.json: conv_bias: expected true or false"),
    "unknown norm": ({"feat_extract_norm": "batch"}, r"feat_extract_norm must be 'group' or 'layer'"),
    "negative eps": ({"layer_norm_eps": -1.0}, r"layer_norm_eps must be in \(0, 1\)"),
    "dropout 2": ({"hidden_dropout": 2.0}, r"hidden_dropout must be a probability"),
    "feature layers disagree": ({"num_feat_extract_layers": 3}, r"num_feat_extract_layers is 3 but conv_dim has 7"),
    "relu": ({"hidden_act": "relu"}, r"hidden_act='relu' is not supported"),
    "8 kHz": ({"sampling_rate": 8000}, r"config\.json: the model takes audio at sampling_rate 8000; w2v2 reads all "
                                      r"audio at 16000 Hz"),
    "more layers than weights": ({"num_hidden_layers": 3}, r"the config asks for 3 Transformer layers but the "
                                                           r"weights hold 2"),
    "fewer conv layers than weights": ({"conv_dim": [32] * 6, "conv_kernel": [10, 3, 3, 3, 3, 2],
                                        "conv_stride": [5, 2, 2, 2, 2, 2], "num_feat_extract_layers": 6},
                                       r"the config asks for 6 conv layers but the weights hold 7"),
    "wider than the weights": ({"hidden_size": 4096}, r"has shape \(.*32.*\), the config implies \(.*4096.*\)"),
    "ffn wider than the weights": ({"intermediate_size": 100_000}, r"intermediate_dense\.(weight|bias) has shape"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_values_are_named(model_dir, case):
    change, match = CONFIG_CASES[case]
    if isinstance(change, dict):
        edit_json(model_dir / "config.json", **change)
    else:
        (model_dir / "config.json").write_text(json.dumps(change))
    refused(model_dir, match)


def test_config_validation_covers_every_construction():
    """Presets, replace() and from_dict share the checks (random inits and pretraining recipes too)."""
    with pytest.raises(ValueError, match="num_hidden_layers must be"):
        config.tiny(num_hidden_layers=-1)
    with pytest.raises(ValueError, match="conv_stride entries"):
        config.base().replace(conv_stride=(5, 2, 2, 2, 2, 2, 0))
    with pytest.raises(ValueError, match="sampling_rate must be 1"):
        config.ModelConfig.from_dict({"sampling_rate": 0})
    assert config.ModelConfig.from_dict(config.large().to_dict()) == config.large()


# --------------------------------------------------------------------------- settings files
@pytest.mark.parametrize("name", ["config.json", "vocab.json", "preprocessor_config.json"])
def test_undecodable_settings_file_is_named(model_dir, name):
    (model_dir / name).write_bytes(b'{"a\xff\xfe": 1}')
    refused(model_dir, rf"{name}: not UTF-8 text \(byte 3\)")


@pytest.mark.parametrize("name", ["config.json", "vocab.json", "preprocessor_config.json"])
def test_empty_or_invalid_settings_file_is_named(model_dir, name):
    (model_dir / name).write_bytes(b"")
    refused(model_dir, rf"{name}: invalid JSON")
    (model_dir / name).write_text("[" * 100_000)
    refused(model_dir, rf"{name}: (invalid JSON|JSON nested too deeply)")


@pytest.mark.parametrize("content, match", [
    ([1, 2], r"vocab\.json: vocabulary must be a JSON object"),
    ({"<pad>": "zero"}, r"vocab\.json: vocabulary must map each token to an integer index"),
    ({"<pad>": 0, "A": 5}, r"vocab\.json: vocab\.json indices must be 0\.\.N-1"),
    ({"A": 0, "B": 1}, r"vocab\.json: vocabulary has no blank token"),
    ({t: i for i, t in enumerate(VOCAB.tokens[:-1])}, r"vocab\.json has 7 tokens but the CTC head has 8 outputs"),
])
def test_bad_vocabulary_is_named(model_dir, content, match):
    (model_dir / "vocab.json").write_text(json.dumps(content))
    refused(model_dir, match)


@pytest.mark.parametrize("content, match", [
    ({"sampling_rate": 8000}, r"preprocessor_config\.json: the model takes audio at sampling_rate 8000"),
    ({"do_normalize": "yes"}, r"preprocessor_config\.json: do_normalize must be true or false"),
    (["x"], r"preprocessor_config\.json: expected a JSON object"),
])
def test_bad_preprocessor_is_named(model_dir, content, match):
    (model_dir / "preprocessor_config.json").write_text(json.dumps(content))
    refused(model_dir, match)


def test_settings_file_that_is_not_a_regular_file_never_blocks(model_dir):
    (model_dir / "config.json").unlink()
    os.mkfifo(model_dir / "config.json")  # opening it would wait for a writer forever
    refused(model_dir, r"config\.json: not a regular file")
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").mkdir()
    refused(model_dir, r"config\.json: not a regular file")


# --------------------------------------------------------------------------- weight files
def test_missing_empty_truncated_or_misplaced_weights(model_dir):
    st = model_dir / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(b"")
    refused(model_dir, r"model\.safetensors: corrupted or truncated weights")
    st.write_bytes(data[: len(data) // 2])
    refused(model_dir, r"model\.safetensors: corrupted or truncated weights")
    st.unlink()
    st.mkdir()
    refused(model_dir, r"model\.safetensors: not a regular file")
    st.rmdir()
    refused(model_dir, r"no model\.safetensors or pytorch_model\.bin")


def test_a_file_of_a_model_directory_points_to_the_directory(model_dir):
    refused(model_dir / "model.safetensors", r"a file of a model directory; pass the directory")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(model_dir, bad):
    """A model with NaN or infinite weights outputs NaN logits, which decode to empty text: refused
    when loaded, naming the tensor, instead of transcribing everything to nothing."""
    st = load_file(str(model_dir / "model.safetensors"))
    st["wav2vec2.encoder.layers.1.feed_forward.output_dense.weight"][3, 5] = bad
    save_file(st, str(model_dir / "model.safetensors"))
    refused(model_dir, r"encoder\.layers\.1\.feed_forward\.output_dense\.weight holds NaN or infinite values")


def test_weights_of_another_dtype_load_as_float32(model_dir):
    st = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v.half() for k, v in st.items()}, str(model_dir / "model.safetensors"))
    model = w2v2.load_model(model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    st["wav2vec2.masked_spec_embed"] = torch.zeros(32, dtype=torch.int64)
    save_file(st, str(model_dir / "model.safetensors"))
    refused(model_dir, r"masked_spec_embed holds torch\.int64 values")


def as_pytorch_bin(model_dir: Path, obj, **kw) -> Path:
    (model_dir / "model.safetensors").unlink()
    torch.save(obj, model_dir / "pytorch_model.bin", **kw)
    return model_dir / "pytorch_model.bin"


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_in_pytorch_model_bin_is_refused_in_one_line(model_dir, capfd):
    as_pytorch_bin(model_dir, {"w": torch.zeros(2), "x": Payload()})
    msg = refused(model_dir, r"pytorch_model\.bin: not a safe weights file: it holds pickled posix\.system")
    assert "pwned" not in capfd.readouterr().out and "weights_only" not in msg


def test_pytorch_model_bin_must_be_a_state_dict(model_dir):
    as_pytorch_bin(model_dir, torch.zeros(3))
    refused(model_dir, r"pytorch_model\.bin: not a state dict")


def test_sharded_safetensors_index_cannot_leave_the_directory(model_dir, tmp_path):
    (model_dir / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    refused(model_dir, r"model\.safetensors\.index\.json: expected a weight_map of tensor names to shard files")


# --------------------------------------------------------------------------- archive bombs
def rewrite_zip(src: Path, dst: Path, change) -> None:
    """Copy a torch.save archive entry by entry; ``change(info, data)`` returns the new data, or a
    number of zero bytes to append while deflating the entry (written in pieces: never in memory)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compresslevel=1) as zout:
        for info in zin.infolist():
            data = change(info, zin.read(info.filename))
            if isinstance(data, bytes):
                zout.writestr(info.filename, data)
                continue
            out = zipfile.ZipInfo(info.filename)
            out.compress_type = zipfile.ZIP_DEFLATED
            with zout.open(out, "w", force_zip64=True) as f:
                f.write(zin.read(info.filename))
                for _ in range(data >> 20):
                    f.write(bytes(1 << 20))


def deflate_bomb(model_dir: Path, weights: dict, zeros: int) -> None:
    """pytorch_model.bin whose first tensor record inflates by ``zeros`` bytes of zeros."""
    path = as_pytorch_bin(model_dir, weights)
    first = []

    def change(info, data):
        if "/data/" in info.filename and not first:
            first.append(info.filename)
            return zeros
        return data

    rewrite_zip(path, path.with_suffix(".tmp"), change)
    path.with_suffix(".tmp").replace(path)


def storage_bomb(model_dir: Path, numel: int) -> None:
    """pytorch_model.bin whose pickle declares a tensor and its storage of ``numel`` bytes for a small record."""
    path = as_pytorch_bin(model_dir, {"w": torch.zeros(70001, dtype=torch.uint8)})

    def change(info, data):
        if info.filename.endswith("data.pkl"):
            data = data.replace(b"J" + struct.pack("<i", 70001), b"J" + struct.pack("<i", numel))
        return data

    rewrite_zip(path, path.with_suffix(".tmp"), change)
    path.with_suffix(".tmp").replace(path)


def legacy_storage_bomb(model_dir: Path, numel: int) -> None:
    """pytorch_model.bin in the pre-zip format of torch < 1.6 whose pickle and storage header both
    declare ``numel`` float32 elements for a 280 kB record."""
    path = as_pytorch_bin(model_dir, {"w": torch.zeros(70001)}, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    at = data.rindex(struct.pack("<q", 70001))  # the storage's element count, just before its bytes
    data = data[:at] + struct.pack("<q", numel) + data[at + 8:]
    path.write_bytes(data.replace(b"J" + struct.pack("<i", 70001), b"J" + struct.pack("<i", numel)))


def peak_rss_of_loads(sources: list[Path]) -> tuple[int, list[tuple[str, int]]]:
    """Load each of ``sources`` in one fresh interpreter, its address space capped (so that a
    regression fails the test instead of exhausting the machine). Returns its peak resident
    memory (MiB) before the first load, and (the outcome, the peak so far) after each load."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
        "import w2v2\n"
        "def peak():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "print('base', peak(), flush=True)\n"
        "for source in sys.argv[1:]:\n"
        "    try:\n"
        "        w2v2.load_model(source)\n"
        "        print('loaded', peak(), flush=True)\n"
        "    except ValueError as e:\n"
        "        print('refused', peak(), e, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, *map(str, sources)], capture_output=True, text=True, env=env,
                         timeout=300)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == len(sources) + 1, out.stdout[-2000:] + out.stderr[-2000:]
    results = []
    for line in lines[1:]:
        outcome, peak, *message = line.split(" ", 2)
        results.append((" ".join([outcome, *message]), int(peak)))
    return int(lines[0].split()[1]), results


def test_archive_and_config_bombs_are_refused_in_bounded_memory(tmp_path):
    """Each hostile file would make an unchecked loader allocate 512 MiB or more (a deflated record of
    zeros; a pickle declaring a tensor far larger than its record, in the zip and the pre-zip
    format; configs far wider or deeper than their weights); each is refused with the loader's peak memory within 200 MiB of the
    interpreter's own (the pre-zip format reserves a declared storage but reads only the file's
    bytes into it). Peak RSS is measured in a subprocess that loads them one after another."""
    def model(name: str) -> Path:
        w2v2.save_pretrained(w2v2.build_model(config.tiny(), vocab=VOCAB), tmp_path / name)
        return tmp_path / name

    cases = {}
    bomb = model("deflate")
    deflate_bomb(bomb, load_file(str(bomb / "model.safetensors")), 512 << 20)
    assert (bomb / "pytorch_model.bin").stat().st_size < 8 << 20  # a few MB that inflate to 512 MiB
    cases["deflate bomb"] = (bomb, r"is compressed, which torch\.save never does")
    storage_bomb(model("storage"), 2**31 - 1)
    cases["storage bomb"] = (tmp_path / "storage", r"pytorch_model\.bin: corrupted or truncated")
    legacy_storage_bomb(model("legacy"), 2**31 - 1)
    cases["legacy storage bomb"] = (tmp_path / "legacy", r"pytorch_model\.bin: corrupted or truncated")
    edit_json(model("wide") / "config.json", hidden_size=8192, num_attention_heads=2, num_conv_pos_embedding_groups=4)
    cases["wide config"] = (tmp_path / "wide", r"has shape .* the config implies")
    edit_json(model("deep") / "config.json", num_hidden_layers=1000, intermediate_size=200_000)
    cases["deep config"] = (tmp_path / "deep", r"asks for 1000 Transformer layers but the weights hold 2")
    base, results = peak_rss_of_loads([source for source, _ in cases.values()])
    for (name, (_, match)), (outcome, peak) in zip(cases.items(), results):
        assert peak - base < 200, (name, peak, base)
        assert outcome.startswith("refused") and re.search(match, outcome), (name, outcome)


def test_zip_directory_declaring_more_than_the_file_holds_is_refused(model_dir):
    path = as_pytorch_bin(model_dir, {"w": torch.zeros(10)})
    data = bytearray(path.read_bytes())
    cd = data.rindex(b"PK\x01\x02")  # the last central directory entry: claim 1 GiB uncompressed
    data[cd + 24: cd + 28] = struct.pack("<I", 1 << 30)
    path.write_bytes(bytes(data))
    refused(model_dir, r"pytorch_model\.bin: (its zip directory declares \d+ bytes|corrupted or truncated)")


# --------------------------------------------------------------------------- fairseq files
def tiny_fairseq(tmp_path: Path, layout="dict", **model_options) -> Path:
    ours = w2v2.build_model(config.tiny(), with_quantizer=True)
    ckpt = fairseq_checkpoint(layout, to_fairseq(ours.state_dict(), True), "group", **model_options)
    torch.save(ckpt, tmp_path / "c.pt")
    return tmp_path / "c.pt"


@pytest.mark.parametrize("spec, match", [
    ("[(32, 10, 5)] * 10**9", r"conv_feature_layers .*: (more than 64 layers|a list can only be repeated)"),
    ("[(32, 10, 5)] * 1000000000", r"conv_feature_layers .*: more than 64 layers"),
    ("__import__('os').system('echo pwned')", r"conv_feature_layers .*: expected lists of"),
    ("[(32, 10, 0)] * 7", r"conv_stride entries must be 1\.\."),
    ("[(32, 10)]", r"each layer must be a \(dim, kernel, stride\) tuple of integers"),
    ("+" * 20000, r"expected a short string"),
    ("[" + "(1,1,1)+" * 3000 + "(1,1,1)]", r"conv_feature_layers"),
])
def test_fairseq_conv_layers_are_parsed_without_eval(tmp_path, spec, match):
    refused(tiny_fairseq(tmp_path, conv_feature_layers=spec), match)


@pytest.mark.parametrize("ckpt, match", [
    ({"cfg": None, "args": None, "model": {}}, r"neither 'cfg' nor 'args'"),
    ({"cfg": {"model": None}, "model": {}}, r"its options have no model section"),
    ({"model": [1, 2]}, r"not a fairseq checkpoint"),
    ({"model": {"w": 3}}, r"its 'model' entry is not a state dict"),
    ({"cfg": {"model": {"w2v_args": None}}, "model": {}}, r"without the pretrained model's options \(w2v_args\)"),
    ({"cfg": {"model": {"encoder_layers": "12"}}, "model": {}}, r"num_hidden_layers: expected an integer, got '12'"),
])
def test_fairseq_checkpoint_structure_is_checked(tmp_path, ckpt, match):
    torch.save(ckpt, tmp_path / "c.pt")
    refused(tmp_path / "c.pt", rf"c\.pt: .*{match}")


def test_fairseq_options_nested_without_end_are_refused(tmp_path):
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    torch.save({"cfg": {"model": deep}, "model": {}}, tmp_path / "c.pt")
    refused(tmp_path / "c.pt", r"c\.pt: its options are nested more than 32 deep")


def test_fairseq_file_empty_truncated_or_not_regular(tmp_path):
    good = tiny_fairseq(tmp_path).read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    refused(bad, r"bad\.pt: corrupted or truncated")
    bad.write_bytes(good[: len(good) // 3])
    refused(bad, r"bad\.pt: corrupted or truncated")
    bad.unlink()
    os.mkfifo(bad)
    refused(bad, r"bad\.pt: not a regular file")


def test_fairseq_letter_dictionary_is_named(tmp_path):
    from .test_checkpoint import VOCAB as V12, ctc_model, fairseq_finetuned_state
    torch.save(fairseq_checkpoint("args", fairseq_finetuned_state(ctc_model()), "group", finetuned=True), tmp_path / "f.pt")
    d = tmp_path / "dict.ltr.txt"
    d.write_bytes(b"A 1\n\xff 2\n")
    refused(tmp_path / "f.pt", r"dict\.ltr\.txt: not UTF-8 text")
    d.write_text("A 1\nA 2\n")
    refused(tmp_path / "f.pt", r"dict\.ltr\.txt: vocabulary has duplicate tokens")
    d.write_text("A 1\nB 2\n")
    refused(tmp_path / "f.pt", rf"dict\.ltr\.txt: 6 tokens but the CTC head has {len(V12)} outputs")


# --------------------------------------------------------------------------- where the model is
@pytest.mark.parametrize("name", ["runs/typo", "./nope", "nope/", "~/no-such-model-w2v2", "model.pt", "x/best.pt",
                                  "org/model.safetensors", "a/b/c"])
def test_mistyped_local_path_is_no_such_file_not_a_hub_download(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_download(repo_id):
        raise AssertionError(f"tried the Hub for {repo_id}")

    monkeypatch.setattr(checkpoint, "_download", no_download)
    refused(name, rf"^{name.replace('.', '[.]')}: no such file or directory$")


def test_hub_id_shaped_name_is_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused("someone/not-downloaded-model-xyz", r"no such local file or directory, and cannot download it")


def test_symlink_loop_and_dangling_link_say_so(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    refused(tmp_path / "loop", r"loop: Too many levels of symbolic links")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    refused(tmp_path / "dangling", r"dangling: No such file or directory \(a symbolic link that leads nowhere\)")


# --------------------------------------------------------------------------- random: inits
def test_random_init_spec_has_one_parser(tmp_path):
    from w2v2.checkpoint import random_init_config
    assert random_init_config("runs/x") is None
    assert random_init_config("random:tiny") == config.tiny()
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4,
                                                 "architectures": ["Wav2Vec2ForCTC"]}))
    assert random_init_config(f"random:{tmp_path / 'c.json'}").hidden_size == 64
    with pytest.raises(CheckpointError, match="unknown preset 'huge'"):
        random_init_config("random:huge")
    with pytest.raises(CheckpointError, match="nope.json: no such file"):
        random_init_config("random:nope.json")
    (tmp_path / "c.json").write_text(json.dumps({"hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"c\.json: hidden_act='relu' is not supported"):
        random_init_config(f"random:{tmp_path / 'c.json'}")
    (tmp_path / "c.json").write_text(json.dumps({"hidden_size": 65536, "num_attention_heads": 16,
                                                 "intermediate_size": 262144, "num_hidden_layers": 1024}))
    with pytest.raises(CheckpointError, match=r"needs \d+ GiB for its weights alone, more than this machine's"):
        random_init_config(f"random:{tmp_path / 'c.json'}")


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize("case", ["layers true", "stride 0", "a list", "more layers than weights"])
def test_cli_reports_bad_models_in_one_line_with_status_1(model_dir, tmp_path, capsys, case):
    change, _ = CONFIG_CASES[case]
    if isinstance(change, dict):
        edit_json(model_dir / "config.json", **change)
    else:
        (model_dir / "config.json").write_text(json.dumps(change))
    assert main(["export", str(model_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("w2v2 export: error: ") and str(model_dir) in err, err
    assert "\n" not in err and "Traceback" not in err and "internal error" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_cli_reports_unsafe_pickle_and_nan_weights_in_one_line(model_dir, tmp_path, capsys):
    st = load_file(str(model_dir / "model.safetensors"))
    st["lm_head.bias"][0] = float("nan")
    save_file(st, str(model_dir / "model.safetensors"))
    assert main(["export", str(model_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "lm_head.bias holds NaN" in err and "\n" not in err
    as_pytorch_bin(model_dir, {"x": Payload()})
    assert main(["export", str(model_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "pytorch_model.bin: not a safe weights file" in err and "\n" not in err


# --------------------------------------------------------------------------- properties
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(0, 70_000) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10)
CONFIG_KEYS = [f.name for f in dataclasses.fields(config.ModelConfig)] + [
    "num_feat_extract_layers", "hidden_act", "feat_extract_activation", "model_type", "architectures",
    "add_adapter", "use_weighted_layer_sum"]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("template") / "m"
    w2v2.save_pretrained(w2v2.build_model(config.tiny(), vocab=VOCAB), out)
    ours = w2v2.build_model(config.tiny(), with_quantizer=True)
    torch.save(fairseq_checkpoint("dict", to_fairseq(ours.state_dict(), True), "group"), out.parent / "c.pt")
    return out


def loads_or_refuses_in_one_line(source: Path, names: str) -> None:
    """Loading ``source`` gives a model, or a ValueError of one line naming ``names`` (a file or
    the directory): never another exception, never a traceback's worth of text."""
    try:
        w2v2.load_model(source)
    except ValueError as e:
        assert "\n" not in str(e) and names in str(e), str(e)


@settings(max_examples=int(os.environ.get("W2V2_FUZZ_CASES", 150)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3))
def test_any_config_values_load_or_are_refused_in_one_line(template, tmp_path, changes):
    d = tmp_path / "m"
    shutil.copytree(template, d, dirs_exist_ok=True)
    edit_json(d / "config.json", **changes)
    loads_or_refuses_in_one_line(d, str(d))


@settings(max_examples=int(os.environ.get("W2V2_FUZZ_CASES", 100)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["m/model.safetensors", "m/config.json", "m/vocab.json", "c.pt"]),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.floats(0, 1))
def test_any_damaged_model_file_loads_or_is_refused_in_one_line(template, tmp_path, name, flips, cut):
    shutil.copytree(template, tmp_path / "m", dirs_exist_ok=True)
    shutil.copy(template.parent / "c.pt", tmp_path / "c.pt")
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    for where, byte in flips:
        data[int(where * len(data))] = byte
    path.write_bytes(bytes(data[: int(cut * len(data))] if cut is not None else data))
    source = tmp_path / "c.pt" if name == "c.pt" else tmp_path / "m"
    loads_or_refuses_in_one_line(source, str(source))


def test_finetune_reports_a_mistyped_init_path_with_the_other_problems(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(checkpoint, "_download", lambda repo_id: pytest.fail(f"tried the Hub for {repo_id}"))
    rc = main(["finetune", "--init", "runs/pretrian", "--train", "missing.tsv", "--valid", "missing.tsv",
               "--out", "runs/ft"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and not (tmp_path / "runs" / "ft").exists()
    assert "--init runs/pretrian: no such file or directory" in err and "missing.tsv" in err, err


@settings(max_examples=int(os.environ.get("W2V2_FUZZ_CASES", 50)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(CONFIG_KEYS), JSON_VALUES, min_size=1, max_size=3))
def test_cli_on_any_config_values_exports_or_fails_in_one_line(template, tmp_path, capsys, changes):
    d, out = tmp_path / "m", tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(template, d, dirs_exist_ok=True)
    edit_json(d / "config.json", **changes)
    rc = main(["export", str(d), str(out)])
    err = capsys.readouterr().err.strip()
    if rc == 0:
        assert (out / "model.safetensors").is_file()
    else:
        assert rc == 1 and err.startswith("w2v2 export: error: ") and "\n" not in err and str(d) in err, err

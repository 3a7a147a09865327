"""CTC fine-tuning: vocabulary, schedule, freezing, masking, overfitting real speech, the CLI run."""

from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import w2v2
from w2v2 import data
from w2v2.cli import main
from w2v2.commands.finetune import add_arguments, configs
from w2v2.config import tiny
from w2v2.finetune import (CTCCollate, CTCFinetuneLoss, FinetuneConfig, freeze_feature_encoder, init_model,
                           run_vocabulary, transformer_parameters, usable_entries)
from w2v2.text import build_vocabulary
from w2v2.trainer import TrainConfig, Trainer, get_lr, read_metrics

# three short speechocean762 utterances (1.6-1.9 s), with the corpus's own transcripts made messier
SHORT = [("000010168", 1.670, "Bye!"), ("000050175", 1.590, "good job"), ("000480090", 1.910, "BY THE HAND.")]


@pytest.fixture
def short_manifest(tmp_path, data_dir):
    path = tmp_path / "short.tsv"
    lines = ["path\tseconds\tspeaker\ttext"]
    lines += [f"{data_dir}/speechocean762-train/audio/{u}.opus\t{s}\tspk\t{t}" for u, s, t in SHORT]
    path.write_text("\n".join(lines) + "\n")
    return path


def loader_for(entries, vocab, max_tokens=10**7):
    ds = data.AudioDataset(entries, max_samples=None)
    sampler = data.BucketBatchSampler([ds.num_samples(i) for i in range(len(ds))], max_tokens)
    return data.make_loader_factory(ds, sampler, CTCCollate(vocab))


def tiny_setup(manifest, grad_scale: float = 0.0, seed: int | None = 0):
    """(entries, vocabulary, random `tiny` CTC model with its feature encoder frozen or scaled)."""
    entries = data.list_entries([manifest])
    vocab = build_vocabulary([e.text for e in entries])
    if seed is not None:
        torch.manual_seed(seed)
    model = init_model("random:tiny", vocab)
    freeze_feature_encoder(model, grad_scale)
    return entries, vocab, model


def train_config(**kw):
    base = dict(lr=3e-3, schedule="constant", warmup_updates=5, max_updates=5, progress=False, device="cpu",
                save_interval=10**6, log_interval=10**6, weight_decay=0.0, seed=0)
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------------------- vocabulary and targets
def test_vocabulary_from_transcripts_any_alphabet(tmp_path):
    vocab = run_vocabulary(tmp_path, ["Привет, мир!", "Ёлка — ёж.", "x-ray"], "upper", resume=False)
    assert vocab.blank_index == 0 and vocab.word_delimiter_index is not None
    letters = {t for t in vocab.tokens if len(t) == 1} - {"|"}
    assert letters == set("ПРИВЕТМЁЛКАЖ") | set("XRAY")  # Cyrillic А and Latin A both
    item = {"wav": torch.zeros(400), "index": 0, "epoch": 0, "speaker": None}
    batch = CTCCollate(vocab)([{**item, "text": "привет,  мир"}, {**item, "text": "ЁЖ"}])
    assert batch["target_lengths"].tolist() == [10, 2]
    assert vocab.decode(batch["targets"][0, :10].tolist()) == "ПРИВЕТ МИР"
    assert batch["targets"][1, 2:].eq(-1).all()
    vocab.save(tmp_path / "vocab.json")  # a resumed run must see the same vocabulary
    with pytest.raises(ValueError, match="another vocabulary"):
        run_vocabulary(tmp_path, ["Hello"], "upper", resume=True)


def test_usable_entries_drop_empty_and_too_short():
    vocab = build_vocabulary(["ABC DEF"])
    model = w2v2.build_model(tiny(), vocab=vocab)
    entries = [data.Entry("a", 1.0, text="ABC"), data.Entry("b", 1.0, text="?!"),
               data.Entry("c", 0.05, text="ABC DEF ABC")]  # 0.05 s = 2 frames
    good, bad = usable_entries(entries, vocab, "upper", model.num_frames)
    assert [e.path for e in good] == ["a"]
    assert [e.path for e, _ in bad] == ["b", "c"]


# ---------------------------------------------------------------------------- schedule
def test_tri_stage_schedule_of_the_cli_defaults():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--init", "random:tiny", "--train", "t", "--valid", "v", "--out", "o",
                         "--max-updates", "100", "--lr", "1e-3"])
    ft, tc = configs(args)
    assert tc.schedule == "tri_stage" and ft.layerdrop == 0.05 and ft.feature_grad_scale == 0.0
    lr = [get_lr(s, tc) for s in range(101)]
    assert lr[0] == pytest.approx(1e-5)  # warm-up from lr * 0.01
    assert all(a < b for a, b in zip(lr[:10], lr[1:11]))  # 10% warm-up
    assert lr[10:50] == [pytest.approx(1e-3)] * 40  # 40% hold
    assert all(a > b for a, b in zip(lr[50:99], lr[51:100]))  # 50% exponential decay
    assert lr[100] == pytest.approx(5e-5)  # to lr * 0.05


# ---------------------------------------------------------------------------- freezing
def test_transformer_frozen_for_n_updates_then_trains(tmp_path, short_manifest):
    entries, vocab, model = tiny_setup(short_manifest)
    parts = {"features": list(model.feature_extractor.parameters()), "transformer": transformer_parameters(model),
             "head": list(model.lm_head.parameters())}
    snap = lambda: {k: [p.detach().clone() for p in ps] for k, ps in parts.items()}  # noqa: E731
    history = [snap()]
    cfg = FinetuneConfig(freeze_updates=3, mask_prob=0.0, mask_channel_prob=0.0)
    trainer = Trainer(model, CTCFinetuneLoss(model, vocab, cfg), loader_for(entries, vocab), train_config(),
                      tmp_path / "run", hooks=[lambda tr, row: history.append(snap())])
    trainer.train()
    same = lambda a, b, k: all(torch.equal(x, y) for x, y in zip(a[k], b[k]))  # noqa: E731
    assert len(history) == 6
    for i in range(1, 6):
        assert same(history[i], history[0], "features"), f"feature encoder changed at update {i}"
        assert not same(history[i], history[i - 1], "head"), f"head did not train at update {i}"
    for i in (1, 2, 3):
        assert same(history[i], history[0], "transformer"), f"Transformer changed during freeze, update {i}"
    for i in (4, 5):
        assert not same(history[i], history[i - 1], "transformer"), f"Transformer did not train at update {i}"
    assert all(p.requires_grad for p in parts["transformer"])
    rows = read_metrics(tmp_path / "run")
    assert [r["frozen"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_masks_reach_the_transformer_input():
    model = w2v2.build_model(tiny(), vocab=build_vocabulary(["AB"])).eval()
    a, b = torch.randn(2, 1, 8000).unbind(0)
    frames = int(model.num_frames(torch.tensor([8000]))[0])
    for kw in ({"mask_channel_indices": torch.ones(1, 32, dtype=torch.bool)},
               {"mask_time_indices": torch.ones(1, frames, dtype=torch.bool)}):
        # every channel (or frame) masked: the Transformer sees the same input whatever the audio
        assert torch.allclose(model(a, **kw).logits, model(b, **kw).logits, atol=1e-6)
    assert not torch.allclose(model(a).logits, model(b).logits)
    torch.manual_seed(0)
    loss = CTCFinetuneLoss(model, model.vocab, FinetuneConfig(mask_prob=0.5, mask_channel_prob=0.5,
                                                               mask_channel_length=4))
    lengths = torch.tensor([frames, frames - 10])
    time, channel = loss.masks(model, 2, frames, lengths)
    assert time.shape == (2, frames) and not time[1, frames - 10:].any() and time.sum() > 0
    assert channel.shape == (2, 32) and channel.any()


# ---------------------------------------------------------------------------- learning
def test_tiny_model_overfits_short_real_utterances(tmp_path, short_manifest):
    entries, vocab, model = tiny_setup(short_manifest)
    cfg = FinetuneConfig(mask_prob=0.0, mask_channel_prob=0.0)
    trainer = Trainer(model, CTCFinetuneLoss(model, vocab, cfg), loader_for(entries, vocab),
                      train_config(max_updates=30), tmp_path / "run")
    trainer.train()
    losses = [r["loss_per_token"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 30 and all(map(lambda x: x == x, losses))
    assert losses[-1] < 0.25 * losses[0], losses


def test_bf16_autocast_fine_tuning_step(tmp_path, short_manifest):
    entries, vocab, model = tiny_setup(short_manifest, seed=None)
    Trainer(model, CTCFinetuneLoss(model, vocab, FinetuneConfig()), loader_for(entries, vocab),
            train_config(max_updates=2, precision="bf16"), tmp_path / "run").train()
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and not any(r["skipped"] for r in rows)
    assert all(0 < r["loss_per_token"] < 100 for r in rows)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: weights stay fp32


# ---------------------------------------------------------------------------- init
def test_init_from_pretrained_dir_keeps_weights_and_adds_head(tmp_path):
    torch.manual_seed(0)
    pre = w2v2.build_model(tiny(), with_quantizer=True)
    w2v2.save_pretrained(pre, tmp_path / "pre")
    vocab = build_vocabulary(["HELLO WORLD"])
    model = init_model(str(tmp_path / "pre"), vocab, layerdrop=0.1, hidden_dropout=None)
    assert model.quantizer is None and model.lm_head.out_features == len(vocab) and model.vocab == vocab
    assert model.encoder.layerdrop == 0.1 and model.config.hidden_dropout == pre.config.hidden_dropout
    src = pre.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items() if not k.startswith("lm_head"))
    # a fine-tuned model with the same vocabulary keeps its head; another vocabulary gets a new one
    w2v2.save_pretrained(model, tmp_path / "ft")
    again = init_model(str(tmp_path / "ft"), vocab)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    other = init_model(str(tmp_path / "ft"), build_vocabulary(["XYZ"]))
    assert other.lm_head.out_features == len(build_vocabulary(["XYZ"]))
    with pytest.raises(ValueError, match="unknown preset"):
        init_model("random:huge", vocab)


# ---------------------------------------------------------------------------- the command
def test_finetune_command_validates_keeps_best_and_resumes(tmp_path, short_manifest, capsys):
    out = tmp_path / "run"
    common = ["finetune", "--init", "random:tiny", "--train", str(short_manifest), "--valid", str(short_manifest),
              "--out", str(out), "--lr", "2e-3", "--valid-interval", "2", "--save-interval", "2",
              "--no-progress", "--freeze-updates", "1"]
    assert main(common + ["--max-updates", "4"]) == 0
    valid = list(csv.DictReader(open(out / "valid.csv")))
    assert [int(r["update"]) for r in valid] == [2, 4]
    best = json.loads((out / "best" / "best.json").read_text())
    key = lambda r: (float(r["valid_wer"]), float(r["valid_cer"]), float(r["valid_loss"]))  # noqa: E731
    assert best["update"] == int(min(valid, key=key)["update"])  # ties in WER go to CER, then loss
    assert w2v2.load_model(out).vocab == w2v2.load_model(out / "best").vocab  # a run dir loads its best model
    transformers = pytest.importorskip("transformers")
    _, info = transformers.Wav2Vec2ForCTC.from_pretrained(out / "best", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    from w2v2.plot import render  # fine-tuning figures come through the plot registry

    written = {p.name for p in render(out, tmp_path / "plots", names=["wer", "emissions"])}
    assert written == {"wer.png", "emissions.png"}

    assert main(common + ["--max-updates", "6"]) == 1  # refuses to overwrite a run
    assert "--resume" in capsys.readouterr().err
    assert main(common + ["--max-updates", "6", "--resume"]) == 0
    assert [int(r["update"]) for r in csv.DictReader(open(out / "valid.csv"))] == [2, 4, 6]
    assert [r["update"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    cfg = json.loads((out / "finetune_config.json").read_text())
    assert cfg["init"] == "random:tiny" and cfg["freeze_updates"] == 1 and cfg["regularisation"]["layerdrop"] == 0.05


@pytest.mark.slow
def test_tiny_model_learns_to_transcribe_short_real_utterances(tmp_path, short_manifest):
    """Past the all-blank plateau (~200 updates), to nearly memorised transcripts (~8 min on 2 busy cores)."""
    from w2v2.audio import load_audio
    from w2v2.finetune import validate

    entries, vocab, model = tiny_setup(short_manifest, grad_scale=1.0)
    cfg = FinetuneConfig(mask_prob=0.0, mask_channel_prob=0.0)
    Trainer(model, CTCFinetuneLoss(model, vocab, cfg), loader_for(entries, vocab),
            train_config(max_updates=300), tmp_path / "run").train()
    v = validate(model, [load_audio(e.path) for e in entries], [e.text for e in entries], vocab, "upper")
    assert v.cer < 0.2, list(zip(v.refs, v.hyps))


def _ddp_finetune_worker(rank, world, rendezvous, manifest, run_dir, out):
    import os

    from w2v2.finetune import finetune

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # a file rendezvous: a TCP port picked free can be taken before the ranks bind it
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import w2v2.trainer as trainer_mod

    seen = []
    original = trainer_mod.Trainer.train

    def train(self, resume=False):  # keep the model to compare the ranks' weights afterwards
        seen.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        seen.append(self)
        return original(self, resume)

    trainer_mod.Trainer.train = train
    cfg = FinetuneConfig(freeze_updates=1, valid_interval=2, max_tokens=32_000, layerdrop=0.5)
    finetune("random:tiny", [str(manifest)], [str(manifest)], run_dir, cfg, train_config(max_updates=3, lr=1e-3))
    final = {k: v.detach().clone() for k, v in seen[1].model.state_dict().items()}
    torch.save({"initial": seen[0], "final": final}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_with_freezing_and_layerdrop_keeps_ranks_in_step(tmp_path, short_manifest):
    """Parameters that get no gradient (frozen Transformer, dropped layers) must not break DDP."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "weights")
    mp.spawn(_ddp_finetune_worker, args=(2, tmp_path / "rendezvous", short_manifest, tmp_path / "run", out),
             nprocs=2, join=True)
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    assert all(torch.equal(a["final"][k], b["final"][k]) for k in a["final"])
    changed = {k for k in a["final"] if not torch.equal(a["final"][k], a["initial"][k])}
    assert "lm_head.weight" in changed and "feature_projection.projection.weight" in changed
    assert not any(k.startswith("feature_extractor.") for k in changed)
    assert [int(r["update"]) for r in csv.DictReader(open(tmp_path / "run" / "valid.csv"))] == [2, 3]


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ABCAAB |é<", max_size=12), with_unk=st.booleans())
def test_frames_needed_equals_min_frames_of_the_encoded_text(text, with_unk):
    """The start-up shortcut counts what min_frames(encode) counts: repeats, spaces, the delimiter
    character itself, and characters outside the vocabulary (mapped to <unk>, or refused)."""
    from w2v2.decoding.alignment import min_frames
    from w2v2.finetune import frames_needed
    from w2v2.vocab import BLANK, UNK, WORD_DELIMITER, Vocabulary

    vocab = Vocabulary((BLANK, *([UNK] if with_unk else []), WORD_DELIMITER, "A", "B", "C"))
    try:
        expected = min_frames(vocab.encode(text))
    except ValueError:
        with pytest.raises(ValueError):
            frames_needed(text, vocab)
        return
    assert frames_needed(text, vocab) == expected

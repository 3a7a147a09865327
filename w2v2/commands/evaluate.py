"""``w2v2 evaluate``: WER/CER of a model (or the PocketSphinx baseline) on manifests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

HELP = "WER/CER of a model on a manifest"
log = logging.getLogger("w2v2.evaluate")


def add_arguments(p) -> None:
    from ..precision import PRECISIONS

    p.add_argument("--model", default=None,
                   help="fine-tuned model: our run/checkpoint dir, HF dir or hub id, fairseq .pt")
    p.add_argument("--engine", choices=("w2v2", "pocketsphinx"), default="w2v2",
                   help="pocketsphinx: the CMU PocketSphinx US English baseline instead of --model")
    p.add_argument("--data", required=True, nargs="+", help="manifest(s) (path seconds speaker text)")
    p.add_argument("--lm", default=None, help="KenLM/ARPA n-gram LM for beam search (w2v2 lm builds one)")
    p.add_argument("--alpha", type=float, default=0.5, help="LM weight (beam search)")
    p.add_argument("--beta", type=float, default=1.0, help="word insertion bonus (beam search)")
    p.add_argument("--beam", type=int, default=None,
                   help="beam width; beam search is used when --beam or --lm is given, else greedy")
    p.add_argument("--batch-seconds", type=float, default=200.0, help="padded audio per forward pass")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="model arithmetic (auto: bf16 where the hardware runs it fast); compare fp32 and "
                        "bf16 WER/CER on your data before trusting the fast path")
    p.add_argument("--case", choices=("upper", "lower", "keep"), default=None,
                   help="case for scoring; default: the model vocabulary's (upper for pocketsphinx)")
    p.add_argument("--out", default=None,
                   help="per-utterance errors TSV (path ref hyp wer cer); with several manifests, "
                        "a folder that gets one <manifest>.errors.tsv each")
    p.add_argument("--limit", type=int, default=None, help="first N utterances of each manifest only")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_engine(args):
    from ..evaluate import PocketSphinxEngine, W2v2Engine

    case = {"keep": None}.get(args.case, args.case)
    if args.engine == "pocketsphinx":
        return PocketSphinxEngine(case=case or "upper")
    from ..checkpoint import load_model

    model = load_model(args.model, device=args.device)
    model.set_precision(args.precision)
    decoder = None
    if args.lm or args.beam:
        from ..decoding import BeamSearchDecoder

        decoder = BeamSearchDecoder(model.vocab, args.lm, alpha=args.alpha, beta=args.beta,
                                    beam_width=args.beam or 100)
    engine = W2v2Engine(model, decoder, batch_seconds=args.batch_seconds, device=args.device,
                        name=str(args.model))
    if args.case is not None:
        engine.case = case
    return engine


def run(args) -> int:
    from ..evaluate import evaluate, format_table, read_utterances, write_errors

    if args.engine == "w2v2" and args.model is None:
        raise ValueError("give --model (or --engine pocketsphinx)")
    engine = build_engine(args)
    rows = []
    for manifest in args.data:
        utts = read_utterances(manifest)[: args.limit]
        log.info("%s: %d utterances", manifest, len(utts))
        result = evaluate(engine, utts, progress=lambda d, n: log.info("  %d/%d", d, n))
        rows.append((engine.name, Path(manifest).name, result))
        if args.out:
            out = Path(args.out)
            if len(args.data) > 1:
                out.mkdir(parents=True, exist_ok=True)
                out = out / f"{Path(manifest).stem}.errors.tsv"
            write_errors(result, out)
            log.info("per-utterance errors: %s", out)
    print(format_table(rows))
    sys.stdout.flush()
    return 0

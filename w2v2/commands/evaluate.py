"""``w2v2 evaluate``: WER/CER of a model (or the PocketSphinx baseline) on manifests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("w2v2.evaluate")


def add_arguments(p) -> None:
    import argparse

    from ._shared import add_decoding_arguments, add_model_arguments

    add_model_arguments(p)  # the transcriber's: evaluate scores what transcribe runs
    p.add_argument("--engine", choices=("w2v2", "pocketsphinx"), default="w2v2",
                   help="pocketsphinx: the CMU PocketSphinx US English baseline instead of --model")
    p.add_argument("--data", required=True, nargs="+", help="manifest(s) (path seconds speaker text)")
    p.add_argument("--case", choices=("upper", "lower", "keep"), default=None,
                   help="case for scoring; None: the model vocabulary's (upper for pocketsphinx)")
    p.add_argument("--out", default=None,
                   help="per-utterance errors TSV (path ref hyp wer cer); with several manifests, "
                        "a folder that gets one <manifest>.errors.tsv each")
    p.add_argument("--limit", type=int, default=None, help="first N utterances of each manifest only")
    add_decoding_arguments(p)
    p.add_argument("--beam", type=int, dest="beam_width", help=argparse.SUPPRESS)  # the old name of --beam-width


def build_engine(args):
    from ..evaluate import PocketSphinxEngine, W2v2Engine

    case = {"keep": None}.get(args.case, args.case)
    if args.engine == "pocketsphinx":
        return PocketSphinxEngine(case=case or "upper")
    from ..transcribe import Transcriber
    from ._shared import load_cli_model, transcribe_options

    options, name = transcribe_options(args), args.model or "default"  # bad options fail before the model loads
    engine = W2v2Engine(Transcriber(load_cli_model(args), options, model_name=name), name=name)
    if args.case is not None:
        engine.case = case
    return engine


def read_inputs(args) -> list[tuple[str, list]]:
    """``(manifest, utterances to score)`` per ``--data``, read before the model loads: every
    problem of every manifest is reported at once; utterances without a transcript to score
    against (empty after normalisation) are excluded with a warning each; a manifest left with
    none is an error."""
    from ..data import ManifestError
    from ..evaluate import read_utterances
    from ..text import normalize_text

    inputs, problems = [], []
    for manifest in args.data:
        try:
            utts = read_utterances(manifest)[: args.limit]
        except ValueError as e:
            problems += getattr(e, "problems", [str(e)])
            continue
        scored = [u for u in utts if normalize_text(u.text, case=None)]
        for u in [u for u in utts if not normalize_text(u.text, case=None)]:
            log.warning("%s: excluding %s: no transcript to score against (the text is empty after normalisation)",
                        manifest, u.path)
        if not scored:
            problems.append(f"{manifest}: no utterance to score (none of {len(utts)} has a transcript)")
        elif len(scored) < len(utts):
            log.warning("%s: %d of %d utterances excluded; WER and CER are over the other %d", manifest,
                        len(utts) - len(scored), len(utts), len(scored))
        inputs.append((manifest, scored))
    if problems:
        raise ManifestError(problems)
    return inputs


def run(args) -> int:
    from ..distributed import dist_info
    from ..evaluate import evaluate, format_table, merge_results, write_errors
    from ..shard import gather, my_share, probe_seconds

    if args.out:  # before any work: a path that can never be written, or a folder that takes no files
        from ._shared import check_output_target

        check_output_target(args.out, folder=len(args.data) > 1, option="--out")
    inputs = read_inputs(args)
    engine = build_engine(args)
    several = dist_info().world_size > 1
    parts, error = [], None  # (positions in the manifest, their result) per manifest; a rank's failure
    for manifest, utts in inputs:
        share = my_share(utts, lambda u: u.seconds if u.seconds is not None else probe_seconds(u.path))
        log.info("%s: %d utterances%s", manifest, len(share), f" of {len(utts)} on this rank" if several else "")
        try:
            parts.append((share, evaluate(engine, [utts[i] for i in share],
                                          progress=lambda d, n: log.info("  %d/%d", d, n))))
        except Exception as e:  # under torchrun: said by rank 0 once every rank has finished
            if not several:
                raise
            error = str(e) or type(e).__name__
            break
    ranks = gather((parts, error))  # every rank's, under torchrun; [ours] in one process
    errors = [e for _, e in ranks if e]
    if errors:
        if not dist_info().is_main:
            return 1
        more = f" (and {len(errors) - 1} more failure(s) on other processes)" if len(errors) > 1 else ""
        raise ValueError(errors[0] + more)
    if not dist_info().is_main:
        return 0
    rows = []
    for k, (manifest, _) in enumerate(inputs):
        result = merge_results([rank_parts[k] for rank_parts, _ in ranks])
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

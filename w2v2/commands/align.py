"""``w2v2 align AUDIO TRANSCRIPT``: word and character times of a known transcript (CTC forced alignment)."""

from __future__ import annotations

import argparse
import os
import tempfile

from ._shared import (add_model_arguments, add_output_arguments, check_output_arguments, emit, load_cli_model,
                      prepare_output_dir, transcribe_options)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audio", metavar="AUDIO", help="audio or video file of any length, - for standard input, or an http(s) URL (needs yt-dlp)")
    parser.add_argument("transcript", metavar="TRANSCRIPT",
                        help="the words spoken: a text file, or the text itself (quote it)")
    add_model_arguments(parser)
    add_output_arguments(parser, default_format="json")


def run(args: argparse.Namespace) -> int:
    from ..audio import download_url, is_url
    from ..transcribe import Transcriber

    check_output_arguments(args)
    transcript = _read_transcript(args.transcript)
    prepare_output_dir(args)
    options = transcribe_options(args)
    model = load_cli_model(args)
    transcriber = Transcriber(model, options, model_name=args.model or "default")
    with tempfile.TemporaryDirectory(prefix="w2v2-url-") as tmp:
        audio = str(download_url(args.audio, tmp)) if is_url(args.audio) else args.audio
        try:
            result = transcriber.align(audio, transcript)
        except ValueError as e:  # the transcript or the audio: name the input
            raise ValueError(str(e) if str(e).startswith(f"{audio}:") else f"{audio}: {e}") from e
    emit(result, audio, args)
    return 0


def _read_transcript(arg: str) -> str:
    if os.path.isfile(arg):
        try:
            text = open(arg, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{arg}: cannot read the transcript ({e})") from e
    else:
        text = arg
    if not text.strip():
        raise ValueError(f"the transcript {'file ' + arg + ' ' if os.path.isfile(arg) else ''}is empty")
    return text

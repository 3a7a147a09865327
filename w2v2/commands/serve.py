"""``w2v2 serve``: OpenAI's audio transcription API and a web page, on the embedded model or --model."""

from __future__ import annotations

import argparse
import os
import sys

from ..transcribe import TranscribeOptions
from ._options import add_fields
from ._shared import FIELD_HELP, add_decoding_arguments, add_model_arguments, load_cli_model, transcribe_options

API_KEY_ENV = "W2V2_API_KEY"
SEGMENT_FIELDS = ("max_segment_chars", "max_segment_seconds", "pause_seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)  # --batch-size as everywhere: padded batches cost more than they save on CPUs
    add_decoding_arguments(parser)
    add_fields(parser.add_argument_group("segments (verbose_json, srt, vtt)"), TranscribeOptions, SEGMENT_FIELDS,
               help=FIELD_HELP)
    add_fields(parser, TranscribeOptions, ("vad",), help=FIELD_HELP)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server to the network (set an --api-key)")
    g.add_argument("--port", type=int, default=8000, help="TCP port")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the API; None: ${API_KEY_ENV} if set, else no key")
    g.add_argument("--max-upload-mb", type=float, default=100.0, help="larger uploads are refused with 413")
    g.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting for the model; past it the answer is 429 with Retry-After")
    g.add_argument("--max-batch-seconds", type=float, default=240.0,
                   help="audio gathered into one batch of requests")
    g.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long the first request of a batch waits for others to join it")
    g.add_argument("--model-id", default=None,
                   help="the model name clients send and /v1/models lists; None: --model's folder name, or "
                        "w2v2-default")


def run(args: argparse.Namespace) -> int:
    try:
        from ..serve import Batcher, ServeSettings, create_app, serve
    except ImportError as e:
        raise ImportError(f"w2v2 serve needs FastAPI and uvicorn: pip install 'w2v2[serve]' ({e})") from None
    from ..transcribe import Transcriber

    if args.max_upload_mb <= 0 or args.max_queue < 1 or args.max_batch_seconds <= 0 or args.batch_wait_ms < 0:
        raise ValueError("--max-upload-mb, --max-queue and --max-batch-seconds must be positive, "
                         "--batch-wait-ms non-negative")
    options = transcribe_options(args)
    model = load_cli_model(args)
    model_id = args.model_id or (os.path.basename(os.path.normpath(args.model)) if args.model else "w2v2-default")
    transcriber = Transcriber(model, options, model_name=args.model or "default")
    batcher = Batcher(transcriber, max_queue=args.max_queue, max_batch_seconds=args.max_batch_seconds,
                      batch_wait=args.batch_wait_ms / 1000)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {args.host} without an API key: anyone who reaches it can use it",
              file=sys.stderr)
    settings = ServeSettings(model_id=model_id, api_key=api_key, max_upload_mb=args.max_upload_mb)
    serve(create_app(batcher, settings), host=args.host, port=args.port)
    return 0

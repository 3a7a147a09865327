"""``w2v2 serve``: an OpenAI-compatible transcription server with a web page.

:func:`create_app` builds the ASGI application around a :class:`Batcher` (one worker thread
owning the model, requests batched onto it); :func:`serve` runs it under uvicorn. Needs the
``serve`` extra (FastAPI, uvicorn, python-multipart).
"""

from .app import ServeSettings, create_app, verbose_json
from .batcher import Batcher, QueueFull

__all__ = ["Batcher", "QueueFull", "ServeSettings", "create_app", "serve", "verbose_json"]


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          drain_seconds: float = 60.0) -> None:
    """Run ``app`` until SIGINT/SIGTERM: then stop accepting, finish the requests in flight (at most
    ``drain_seconds``), finish the queue, and return."""
    import signal

    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain_seconds)
    # uvicorn re-raises the signal that stopped it once it has drained, under the handler it found:
    # a do-nothing SIGTERM handler makes a drained shutdown an ordinary exit (status 0), as the
    # process managers that send SIGTERM (systemd, Kubernetes, docker stop) expect.
    before = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, before)

"""``w2v2 serve``: OpenAI's transcription API driven by the official ``openai`` client, every
error status, the queue limit, disconnects, SIGTERM draining, the API key, temporary files.

The server runs as a real process (uvicorn on a free loopback port) on the embedded default
model, with real speech from ../shared/data; the batcher is also tested alone with a stand-in
transcriber, where timing can be controlled.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from .conftest import first_clips

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from w2v2.serve.process import ServerProcess  # noqa: E402

KEY = "test-key-0123456789"


class Server(ServerProcess):
    """The server with its temporary files under ``tmp`` and no API key from the environment."""

    def __init__(self, tmp: Path, *args: str):
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        super().__init__(*args, env={"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "W2V2_API_KEY": ""})

    def client(self, key: str | None = None) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0)

    def leftovers(self) -> list[Path]:
        return [p for p in self.tmp.rglob("*") if p.is_file()]


def laid_end_to_end(clips: list[Path], times: int, path: Path) -> Path:
    """A long recording: the clips one after another, ``times`` over (keeps the model busy)."""
    sf.write(path, np.concatenate([sf.read(c, dtype="float32")[0] for c in clips] * times), 16000)
    return path


@pytest.fixture(scope="module")
def clips():
    return first_clips("ljspeech-amateur", 6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--max-upload-mb", "2")
    yield s
    assert s.stop() == 0


def test_openai_client_every_response_format(server, clips):
    client = server.client(KEY)
    assert [m.id for m in client.models.list()] == ["w2v2-default"]
    with open(clips[0], "rb") as f:
        plain = client.audio.transcriptions.create(model="w2v2-default", file=f)
    assert plain.text.strip() and plain.text == plain.text.strip()
    with open(clips[0], "rb") as f:
        verbose = client.audio.transcriptions.create(model="w2v2-default", file=f, response_format="verbose_json",
                                                     timestamp_granularities=["word", "segment"])
    assert verbose.text == plain.text
    assert verbose.duration == pytest.approx(sf.info(clips[0]).duration, abs=0.05)
    assert [w.word for w in verbose.words] == plain.text.split()
    assert all(0 <= w.start < w.end <= verbose.duration + 0.03 for w in verbose.words)
    assert " ".join(s.text for s in verbose.segments) == plain.text
    assert verbose.segments[0].start == verbose.words[0].start
    for fmt, check in (("text", lambda t: t.strip() == plain.text),
                       ("srt", lambda t: t.startswith("1\n00:00:") and " --> " in t),
                       ("vtt", lambda t: t.startswith("WEBVTT") and " --> " in t)):
        with open(clips[0], "rb") as f:
            out = client.audio.transcriptions.create(model="w2v2-default", file=f, response_format=fmt,
                                                     language="en", prompt="ignored", temperature=0.0)
        assert isinstance(out, str) and check(out), (fmt, out)


def test_the_cli_writes_the_same_transcript(server, clips, tmp_path):
    from w2v2.cli import main

    assert main(["transcribe", str(clips[1]), "-o", str(tmp_path)]) == 0
    with open(clips[1], "rb") as f:
        served = server.client(KEY).audio.transcriptions.create(model="w2v2-default", file=f, response_format="text")
    assert served.strip() == (tmp_path / f"{clips[1].stem}.txt").read_text().strip()


def test_error_statuses(server, clips, tmp_path):
    client = server.client(KEY)
    with pytest.raises(openai.AuthenticationError):
        with open(clips[0], "rb") as f:
            server.client("wrong-key").audio.transcriptions.create(model="w2v2-default", file=f)
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("hello, not audio")
    with pytest.raises(openai.BadRequestError) as e, open(not_audio, "rb") as f:
        client.audio.transcriptions.create(model="w2v2-default", file=f)
    message = e.value.body["message"]
    assert message.startswith("notes.wav: ") and "\n" not in message and str(server.tmp) not in message
    with pytest.raises(openai.BadRequestError, match="model 'whisper-1' is not served"), open(clips[0], "rb") as f:
        client.audio.transcriptions.create(model="whisper-1", file=f)
    auth = {"Authorization": f"Bearer {KEY}"}
    post = lambda **kw: httpx.post(server.url + "/v1/audio/transcriptions", headers=auth, timeout=60, **kw)  # noqa: E731
    audio = clips[0].read_bytes()
    for data, param in (({"response_format": "mp3"}, "response_format"), ({"colour": "blue"}, "colour"),
                        ({"timestamp_granularities[]": "sentence", "response_format": "verbose_json"},
                         "timestamp_granularities"),
                        ({"temperature": "warm"}, "temperature")):
        r = post(files={"file": ("a.flac", audio)}, data=data)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (data, r.text)
    r = post(data={"model": "w2v2-default"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    big = tmp_path / "big.wav"
    sf.write(big, np.zeros(16000 * 70, dtype=np.float32), 16000)  # 2.2 MB, over the 2 MB limit
    r = post(files={"file": ("big.wav", big.read_bytes())})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"

    def chunked():  # no Content-Length: refused while it streams
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 100_000

    r = httpx.post(server.url + "/v1/audio/transcriptions", headers={**auth, "Content-Type":
                   "multipart/form-data; boundary=x"}, content=chunked(), timeout=60)
    assert r.status_code == 413


def test_upload_name_is_never_a_path(server, tmp_path):
    target = server.tmp.parent / "escaped.txt"
    r = httpx.post(server.url + "/v1/audio/transcriptions", headers={"Authorization": f"Bearer {KEY}"},
                   files={"file": ("../../escaped.txt", b"not audio")}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("escaped.txt: ")
    assert not target.exists() and not server.leftovers()


def test_queue_limit_answers_429_with_retry_after(tmp_path, clips):
    long = laid_end_to_end(clips, 8, tmp_path / "long.wav")
    s = Server(tmp_path / "srv", "--max-queue", "1", "--max-batch-seconds", "30")
    try:
        def send(_):
            with open(long, "rb") as f:
                return httpx.post(s.url + "/v1/audio/transcriptions", files={"file": ("long.wav", f)}, timeout=120)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(send, range(6)))
        codes = sorted(r.status_code for r in answers)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
        busy = next(r for r in answers if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) > 0 and busy.json()["error"]["code"] == "queue_full"
    finally:
        assert s.stop() == 0
    assert not s.leftovers()


def test_a_disconnected_client_frees_its_work_and_sigterm_drains(tmp_path, clips):
    long = laid_end_to_end(clips, 10, tmp_path / "long.wav")
    s = Server(tmp_path / "srv", "--max-batch-seconds", "30", "--batch-wait-ms", "0")
    try:
        def send():
            with open(long, "rb") as f:
                return httpx.post(s.url + "/v1/audio/transcriptions", files={"file": ("long.wav", f)}, timeout=120)

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(send)  # keeps the model busy
            time.sleep(1.0)
            quitter = socket.create_connection(s.url.removeprefix("http://").split(":"))
            body = clips[0].read_bytes()
            head = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.flac\"\r\n\r\n" + body
                    + b"\r\n--x--\r\n")
            quitter.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=x\r\nContent-Length: " + str(len(head)).encode() + b"\r\n\r\n" + head)
            time.sleep(0.5)
            quitter.close()  # gone before its turn
            last = pool.submit(send)
            time.sleep(0.5)
            os.kill(s.pid, signal.SIGTERM)  # in flight: `first` and `last` still get their answers
            assert first.result().status_code == 200 and last.result().status_code == 200
        assert s.proc.wait(60) == 0  # no second signal: uvicorn takes that as "exit now"
        log = "".join(s.log)
        assert "skipped 1 request" in log, log
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.url + "/health", timeout=5)
    finally:
        s.stop(signal.SIGKILL)
    assert not s.leftovers()


# --------------------------------------------------------------------------- the batcher alone
class SlowTranscriber:
    """transcribe_many's contract with a controllable delay; records each call's inputs."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail, self.calls = delay, fail, []

    def transcribe_many(self, sources):
        seen = []
        self.calls.append(seen)
        for key, path in sources:
            seen.append(path)
            time.sleep(self.delay)
            if self.fail:
                raise MemoryError("out of memory")
            if path == "bad":
                yield key, ValueError("bad: not audio")
            else:
                yield key, {"text": path}


def test_batcher_gathers_requests_into_one_call_in_length_order():
    from w2v2.serve import Batcher

    t = SlowTranscriber(delay=0.01)
    b = Batcher(t, max_queue=10, max_batch_seconds=100, batch_wait=0.2)
    jobs = [b.submit(name, seconds) for name, seconds in (("a", 30.0), ("bad", 5.0), ("c", 12.0))]
    b.start()
    assert jobs[0].future.result(10) == {"text": "a"} and jobs[2].future.result(10) == {"text": "c"}
    with pytest.raises(ValueError, match="not audio"):
        jobs[1].future.result(10)
    b.stop(10)
    assert t.calls == [["bad", "c", "a"]]  # shortest first: neighbours share padded passes


def test_batcher_bounds_batches_queue_and_skips_cancelled():
    from w2v2.serve import Batcher, QueueFull

    t = SlowTranscriber(delay=0.05)
    b = Batcher(t, max_queue=3, max_batch_seconds=25, batch_wait=0.5)
    jobs = [b.submit(name, 10.0) for name in "abc"]
    with pytest.raises(QueueFull):
        b.submit("d", 1.0)
    jobs[2].cancelled = True
    b.start()
    assert [j.future.result(10)["text"] for j in jobs[:2]] == ["a", "b"]
    b.stop(10)
    assert jobs[2].future.cancelled() and b.skipped == 1
    assert t.calls == [["a", "b"], []]  # 20 s fit in 25 s; c (over the limit) started the next batch, skipped


def test_batcher_model_failure_fails_each_job_of_its_batch_and_goes_on():
    from w2v2.serve import Batcher

    t = SlowTranscriber(fail=True)
    b = Batcher(t, max_queue=4, max_batch_seconds=100, batch_wait=0.2)
    jobs = [b.submit(name, 1.0) for name in "ab"]
    b.start()
    for j in jobs:
        with pytest.raises(MemoryError):
            j.future.result(10)
    t.fail = False
    assert b.submit("c", 1.0).future.result(10) == {"text": "c"}
    b.stop(10)

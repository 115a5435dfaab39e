"""`kvretrieve serve` as a real process on 127.0.0.1, driven by the official `openai` client: answers
equal the Python API's, streamed or not; prefix reuse is reported; concurrent clients get their own
answers; bad requests get OpenAI-shaped 4xx and the server keeps serving; a client that goes away
frees the model; Ctrl-C and SIGTERM exit 0."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import kvretrieve
from kvretrieve import SamplingParams

openai = pytest.importorskip("openai")

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--device", "cpu", "--dtype", "float32", "--max-context", "1024"]
NAME = "smol"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, smol_dir, *extra: str):
        self.port = free_port()
        cmd = [sys.executable, "-m", "kvretrieve", "serve", "--model", str(smol_dir), "--port", str(self.port),
               "--model-name", NAME, *ARGS, *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.get("/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.communicate()
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as r:
            body = r.read().decode()
            return json.loads(body) if r.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def server(smol_dir):
    s = ServerProcess(smol_dir)
    yield s
    if s.proc.poll() is None:
        s.stop()


@pytest.fixture(scope="module")
def local(smol_dir):
    return kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=1024)


CHATS = [[{"role": "user", "content": q}] for q in
         ("Name three rivers.", "Who was Ada Lovelace?", "Write a haiku about tea.", "What is 2 + 2?")]
LONG = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]  # 900 tokens, no EOS


def test_answers_equal_the_python_api_streamed_or_not(server, local):
    c, greedy = server.client, SamplingParams(max_new_tokens=24, temperature=0)
    assert [m.id for m in c.models.list().data] == [NAME]
    want = local.generate(CHATS[0], sampling=greedy, return_details=True)
    r = c.chat.completions.create(model=NAME, messages=CHATS[0], max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == 24
    pieces, usage = [], None
    for ch in c.chat.completions.create(model=NAME, messages=CHATS[0], max_tokens=24, temperature=0, stream=True,
                                        stream_options={"include_usage": True}):
        pieces += [ch.choices[0].delta.content or ""] if ch.choices else []
        usage = ch.usage or usage
    assert "".join(pieces) == want.text
    # the same prompt again: all but its last token come from the KV cache
    assert usage.prompt_tokens_details.cached_tokens == want.prompt_tokens - 1
    text = local.generate("The capital of France is", sampling=SamplingParams(max_new_tokens=8, temperature=0))
    r = c.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text == text
    r = c.chat.completions.create(model=NAME, messages=CHATS[3], max_tokens=40, temperature=0, stop=["4"])
    assert r.choices[0].finish_reason == "stop" and "4" not in r.choices[0].message.content


def test_concurrent_clients_get_their_own_answers(server, local):
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    want = [local.generate(m, sampling=greedy) for m in CHATS]
    got, errors = {}, []

    def client(i: int) -> None:
        try:
            messages = CHATS[i % len(CHATS)]
            got[i] = server.client.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                                           temperature=0, stream=i % 2 == 1)
            if i % 2:
                got[i] = "".join(ch.choices[0].delta.content or "" for ch in got[i] if ch.choices)
            else:
                got[i] = got[i].choices[0].message.content
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert [got[i] for i in range(8)] == [want[i % len(CHATS)] for i in range(8)]
    # they decoded together: several sessions, several requests in one step
    values = dict(line.split(" ", 1) for line in server.get("/metrics").splitlines() if not line.startswith("#"))
    sessions, rows = int(values["kvretrieve_sessions"]), int(values["kvretrieve_batch_rows_max"])
    assert sessions > 1 and rows > 1, (sessions, rows)


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    cases = [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"),
             (json.dumps({"model": "gpt-9", "messages": CHATS[0]}).encode(), 404, "does not exist"),
             (json.dumps({"messages": []}).encode(), 400, "messages"),
             (json.dumps({"messages": CHATS[0], "max_tokens": 10**9}).encode(), 400, "max_tokens"),
             (json.dumps({"messages": CHATS[0], "n": 2}).encode(), 400, "'n'"),
             (json.dumps({"messages": CHATS[0], "temperature": "hot"}).encode(), 400, "temperature"),
             (json.dumps({"messages": [{"role": "user", "content": "tide " * 3000}]}).encode(), 413, "context")]
    for body, status, fragment in cases:
        got, err = server.post("/v1/chat/completions", body)
        assert got == status and fragment in err["error"]["message"], (body[:60], got, err)
        assert set(err["error"]) == {"message", "type", "param", "code"}
    got, err = server.post("/v1/nowhere", b"{}")
    assert got == 404 and "error" in err
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=NAME, prompt="", max_tokens=4)
    assert server.get("/health")["status"] == "ok"
    r = server.client.chat.completions.create(model=NAME, messages=CHATS[3], max_tokens=4, temperature=0)
    assert r.choices[0].message.content
    metrics = server.get("/metrics")
    assert 'kvretrieve_requests_total{endpoint="/v1/chat/completions",status="413"} 1' in metrics
    assert "kvretrieve_waiting_requests 0" in metrics and 'kvretrieve_kv_bytes{part="kv"}' in metrics


def test_a_client_that_goes_away_frees_the_model_at_once(server):
    """A stream asked for 900 tokens is dropped after a few chunks: the next request is answered
    without waiting for the 900 (the server closed the abandoned generation)."""
    t0 = time.monotonic()
    r = server.client.chat.completions.create(model=NAME, messages=CHATS[1], max_tokens=2, temperature=0)
    one_request = time.monotonic() - t0
    stream = server.client.chat.completions.create(model=NAME, messages=LONG, max_tokens=900, temperature=0,
                                                   stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    r = server.client.chat.completions.create(model=NAME, messages=CHATS[1], max_tokens=2, temperature=0)
    assert r.choices[0].message.content and time.monotonic() - t0 < 10 * one_request + 2
    deadline = time.monotonic() + 10
    while "kvretrieve_waiting_requests 0" not in server.get("/metrics"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_requests_past_the_waiting_limit_get_429(smol_dir):
    s = ServerProcess(smol_dir, "--max-waiting", "1")
    try:
        stream = s.client.chat.completions.create(model=NAME, messages=LONG, max_tokens=300, temperature=0,
                                                  stream=True)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="already waiting or running"):
            s.client.chat.completions.create(model=NAME, messages=CHATS[0], max_tokens=2)
        stream.close()
    finally:
        code, err = s.stop(signal.SIGINT)
    assert code == 0 and "stopped" in err and "Traceback" not in err


def test_sigterm_exits_0_and_a_taken_port_is_one_line(smol_dir, server):
    taken = subprocess.run([sys.executable, "-m", "kvretrieve", "serve", "--port", str(server.port), *ARGS],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert taken.returncode == 1 and "cannot listen" in taken.stderr and "--port" in taken.stderr
    s = ServerProcess(smol_dir)
    code, err = s.stop(signal.SIGTERM)
    assert code == 0 and "stopped" in err and "Traceback" not in err


def test_served_documents_come_before_every_chat_request_and_are_prefilled_once(smol_dir, local):
    """`serve -d FILE`: a chat request gets the documents in front of its first user message, as `kvretrieve
    chat` sends them; their prefill happens at start (the request reuses it) and goes to the document
    cache, which the next server start reopens."""
    from kvretrieve.cli.conversation import documents_block
    from kvretrieve.documents import with_documents
    from test_cli import DOC

    s = ServerProcess(smol_dir, "-d", str(DOC))
    try:
        question = [{"role": "user", "content": "Who was the first keeper of the lighthouse?"}]
        r = s.client.chat.completions.create(model=NAME, messages=question, max_tokens=24, temperature=0)
    finally:
        code, err = s.stop()
    want = local.generate(with_documents(question, documents_block([str(DOC)], local), None),
                          sampling=SamplingParams(max_new_tokens=24, temperature=0), return_details=True)
    assert r.choices[0].message.content == want.text and "Margaret" in want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.prompt_tokens_details.cached_tokens > 300
    assert code == 0 and "saved for next time" in err
    again = ServerProcess(smol_dir, "-d", str(DOC))
    code, err = again.stop()
    assert code == 0 and "reopened their saved prefill" in err
    # a server without -d: a request that carries the same documents itself starts with the saved
    # prefill's tokens, which the document cache reopens instead of prefilling
    plain = ServerProcess(smol_dir)
    try:
        messages = with_documents(question, documents_block([str(DOC)], local), None)
        r = plain.client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    finally:
        code, _ = plain.stop()
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens_details.cached_tokens > 300

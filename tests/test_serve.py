"""The online endpoint (jobs.serve / pipeline.serve): real HTTP on loopback, the `openai` client, a tiny model."""

import asyncio
import json
import time
import urllib.error
import urllib.request

import psutil
import pytest

from tests.pipeline_helpers import free_port, save_tiny_model

KEY = "test-key-0123456789"
PROMPTS = ["Tell me a story about a cat.", "What is two plus two?", "Name three rivers.", "Hello",
           "Write a haiku about rain.", "Why is the sky blue?", "List some colors.", "Count to ten."]


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from jobs.generate import load_config
    from jobs.serve import start
    from pipeline.serve.app import ServeConfig, validate_serve

    root = tmp_path_factory.mktemp("serve")
    model = save_tiny_model(root / "tiny", tied=False, context=1024)  # untied: it writes (random) words
    cfg = load_config(None, [
        f"model.source={model}", "model.dtype=float64", "engine.max_batch=4", f"serve.port={free_port()}",
        f"serve.api_key={KEY}", f"search.costs={root / 'costs.json'}", "generation.max_tokens=12",
        "generation.max_tokens_limit=1000", "serve.max_prompt_tokens=200", "serve.max_body_bytes=20000",
        "serve.model_name=tiny"], ServeConfig, validate_serve)
    url = start(cfg)
    yield url, model
    from ray import serve

    serve.shutdown()


@pytest.fixture(scope="module")
def offline(served):
    """Greedy output of the plain engine (no server) for a prompt, as token ids and text."""
    from conflayers import Engine, GenerationConfig, NoDrafter
    from conflayers.models import encode_prompts, load_model

    model, tok = load_model(served[1], "float64", "cpu")
    engine = Engine(model, kernels="native")

    def run(prompt, max_tokens, chat):
        ids = encode_prompts(tok, [[{"role": "user", "content": prompt}]], chat=True)[0] if chat else \
            list(tok(prompt)["input_ids"])
        out = engine.generate([ids], GenerationConfig(max_new_tokens=max_tokens), NoDrafter())[0]
        return ids, out.token_ids, tok.decode(out.token_ids, skip_special_tokens=True)

    return run


@pytest.fixture()
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url, body, key=KEY, raw=None):
    """A raw POST: (status, JSON body)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json",
                                                                         "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(url):
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        return json.loads(r.read())


def test_completion_and_chat_equal_the_engine_offline(client, offline):
    ids, toks, text = offline(PROMPTS[0], 10, chat=False)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 10, len(ids) + 10)
    ids, toks, text = offline(PROMPTS[1], 9, chat=True)
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}],
                                       max_tokens=9, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 9)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_gives_the_same_text_in_chunks_then_usage_and_done(client, offline, served):
    ids, toks, text = offline(PROMPTS[2], 11, chat=True)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=11, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text and len(deltas) > 2
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 11
    assert chunks[-1].usage.prompt_tokens == len(ids)
    ids, toks, text = offline(PROMPTS[3], 7, chat=False)
    pieces = list(client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=7, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces) == text
    # the wire format: server-sent events ending with [DONE]
    req = urllib.request.Request(served[0] + "/v1/completions", method="POST", data=json.dumps(
        {"model": "tiny", "prompt": PROMPTS[3], "max_tokens": 3, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_stop_strings_end_the_text_before_them(client, offline):
    ids, toks, text = offline(PROMPTS[4], 30, chat=False)
    stop = text[12:16]
    assert stop and stop in text
    cut = text[: text.index(stop)]
    r = client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=30, temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30
    streamed = list(client.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=30, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_concurrent_requests_all_complete_with_the_right_usage(served, offline):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)
    budgets = [5, 9, 13, 7, 11, 6, 8, 10]

    async def one(i):
        if i % 2:
            r = await client.chat.completions.create(model="tiny", max_tokens=budgets[i], temperature=0,
                                                     messages=[{"role": "user", "content": PROMPTS[i]}])
            return r.choices[0].message.content, r.usage
        r = await client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=budgets[i], temperature=0)
        return r.choices[0].text, r.usage

    async def sampled():
        r = await client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=6, temperature=0.9, top_p=0.9,
                                            extra_body={"top_k": 40})
        return r.usage.completion_tokens

    async def everything():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8)), sampled(), sampled()), 300)

    t0 = time.perf_counter()
    results = asyncio.run(everything())
    for i, (text, use) in enumerate(results[:8]):
        ids, toks, want = offline(PROMPTS[i], budgets[i], chat=bool(i % 2))
        assert text == want
        assert (use.prompt_tokens, use.completion_tokens, use.total_tokens) == (len(ids), len(toks),
                                                                                 len(ids) + len(toks))
    assert results[8:] == [6, 6]
    assert time.perf_counter() - t0 < 300


def test_a_seed_reproduces_a_sampled_completion(client):
    kw = dict(model="tiny", prompt=PROMPTS[5], max_tokens=12, temperature=1.0, seed=1234)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


@pytest.mark.parametrize("raw,message", [
    (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', "'temperature' must be a number"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}", "at most 1000"),
    (b'{"model": "tiny", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    (b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid JSON"),
])
def test_non_finite_huge_or_deeply_nested_json_gets_a_400(served, raw, message):
    code, out = post(served[0] + "/v1/completions", None, raw=raw)
    assert code == 400 and message in out["error"]["message"], out


def test_neutral_values_text_parts_and_tiny_temperatures_are_accepted(served, offline):
    ids, toks, text = offline(PROMPTS[6], 6, chat=True)
    body = {"model": "tiny", "max_tokens": 6, "temperature": 1e-9, "logprobs": False, "tools": [], "n": 1,
            "response_format": {"type": "text"},
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[6]}]}]}
    code, out = post(served[0] + "/v1/chat/completions", body, key=KEY)
    assert code == 200 and out["choices"][0]["message"]["content"] == text  # 1e-9: greedy
    req = urllib.request.Request(served[0] + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:  # the scheme is case-insensitive
        assert json.loads(r.read())["data"][0]["id"] == "tiny"


@pytest.mark.parametrize("body,status,message", [
    (None, 400, "not valid JSON"),
    ({"model": "tiny"}, 400, "'messages' is required"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "'max_tokens' must be >= 1"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi " * 400}]}, 400, "this server takes at most 200"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "'gpt-9' does not exist"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "'n' is not supported"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "'logprobs'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "'tools'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "at most 1000"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400,
     "at most 4"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400, "'temperature'"),
    ({"model": "tiny", "messages": "hi"}, 400, "non-empty list"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 30000}]}, 413, "at most 20000"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400, "unknown field(s): bogus"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served, body, status, message):
    raw = b"{not json" if body is None else None
    code, out = post(served[0] + "/v1/chat/completions", body, raw=raw)
    assert code == status and message in out["error"]["message"], out
    code, out = post(served[0] + "/v1/completions", {"model": "tiny", "prompt": "still there?", "max_tokens": 2})
    assert code == 200 and out["usage"]["completion_tokens"] == 2


def test_the_api_key_is_checked_on_every_request(served):
    from openai import AuthenticationError, OpenAI

    for key in ("wrong-key-123", ""):
        code, out = post(served[0] + "/v1/completions", {"model": "tiny", "prompt": "hi"}, key=key)
        assert code == 401 and "API key" in out["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served[0] + "/v1", api_key="nope-nope-nope", max_retries=0).models.list()
    assert health(served[0])["status"] == "ok"  # the health check needs no key


def test_a_client_that_goes_away_frees_its_slot(served):
    before = health(served[0])["served"]
    req = urllib.request.Request(served[0] + "/v1/completions", method="POST", data=json.dumps(
        {"model": "tiny", "prompt": "Go on and on.", "max_tokens": 900, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    assert r.readline().startswith(b"data: ")
    r.close()  # hang up after the first chunk
    deadline = time.time() + 60
    while time.time() < deadline:
        h = health(served[0])
        if h["served"]["aborted"] > before["aborted"] and h["in_flight"] == 0:
            break
        time.sleep(0.2)
    assert h["served"]["aborted"] == before["aborted"] + 1 and h["in_flight"] == 0
    assert h["served"]["aborted_tokens"] - before["aborted_tokens"] < 900  # ended early, not run to its budget


def _serve_processes():
    return [p for p in psutil.process_iter(["cmdline"])
            if any(n in " ".join(p.info["cmdline"] or []) for n in ("ServeReplica", "ServeController", "ProxyActor"))]


def test_shutdown_is_clean(served):
    from ray import serve

    assert _serve_processes()
    serve.shutdown()
    deadline = time.time() + 60
    while _serve_processes() and time.time() < deadline:
        time.sleep(0.5)
    assert _serve_processes() == []
    with pytest.raises(OSError):
        health(served[0])

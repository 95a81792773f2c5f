"""`fluid serve`: the sampling page and its JSON API, batching of concurrent requests, bad
requests, the command (Ctrl-C), and the page in a headless browser."""

import base64
import contextlib
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import perturbed, tiny_config, untrained_pipeline
from PIL import Image

import fluid
import fluid.serve._batcher as batcher_module
from fluid.build import build_model
from fluid.cli import main
from fluid.sample import sample_images, sample_images_per_key
from fluid.serve import (
    MAX_BODY,
    BadRequest,
    Batcher,
    Job,
    ServerClosed,
    Settings,
    image_keys,
    make_server,
)

CHROMIUM = Path("/usr/bin/chromium")


def _chromium_runs() -> bool:
    """Whether /usr/bin/chromium is there and starts (not a stub asking for a snap)."""
    if not CHROMIUM.exists():
        return False
    try:
        done = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"Chromium" in done.stdout
BATCH = 2  # images per call in these tests: one compiled program serves them all


@pytest.fixture(scope="module")
def pipe():
    return untrained_pipeline(tiny_config())


@contextlib.contextmanager
def running(pipe, **kwargs):
    """A server on a free loopback port, serving from a thread until the block ends."""
    server = make_server(pipe, port=0, batch_size=BATCH, log=None, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.close()
        thread.join()


@pytest.fixture(scope="module")
def server(pipe):
    with running(pipe, max_wait=0.0) as server:
        yield server


def call(server, path, body=None, *, raw=None, method=None):
    """`(status, decoded JSON or text)` of one request; `raw` bytes are sent as they are."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.url + path.lstrip("/"), data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, kind, payload = response.status, response.headers["Content-Type"], \
                response.read()
    except urllib.error.HTTPError as error:
        status, kind, payload = error.code, error.headers["Content-Type"], error.read()
    return status, json.loads(payload) if kind == "application/json" else payload.decode()


def pixels(answer) -> list[np.ndarray]:
    out = []
    for png in answer["images"]:
        image = Image.open(io.BytesIO(base64.b64decode(png)))
        assert image.format == "PNG"
        out.append(np.asarray(image))
    return out


def test_the_page_and_the_models_description(server, pipe):
    status, page = call(server, "/")
    assert status == 200 and page.startswith("<!doctype html>")
    assert 'id="prompt"' in page and 'id="negative_prompt"' in page and "api/generate" in page
    status, info = call(server, "/api/info")
    assert status == 200
    config = pipe.config
    assert info["variant"] == {"tokenizer": "patch", "head": "diffusion", "order": "random",
                               "backbone": "bidirectional", "text_encoder": "learned"}
    assert info["image_size"] == 16 and info["tokens"] == pipe.model.seq_len
    assert info["defaults"] == {"steps": config.sample_steps, "cfg": config.sample_cfg,
                                "cfg_schedule": "linear",
                                "temperature": config.sample_temperature, "num_images": 1}
    assert info["limits"]["num_images"] == [1, BATCH]
    assert info["negative_prompts"] is True and info["parameters"] > 1000
    status, answer = call(server, "/nowhere")
    assert status == 404 and "the page is /" in answer["error"]


def test_a_requests_images_are_the_pipelines_for_its_seed(server, pipe):
    status, answer = call(server, "/api/generate", {"prompt": "a red circle", "seed": 3,
                                                    "num_images": 2})
    assert status == 200, answer
    assert answer["seed"] == 3 and answer["seconds"] > 0
    images = pixels(answer)
    assert [x.shape for x in images] == [(16, 16, 3)] * 2
    # Image j is drawn from key(seed) folded with j (j > 0), as the pipeline draws batches of
    # one; so the first is what `fluid sample --seed 3` gives for the prompt alone.
    expected = pipe("a red circle", num_images_per_prompt=2, seed=3, batch_size=1)
    for got, want in zip(images, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))
    assert not np.array_equal(images[0], images[1])
    # Without a seed the server draws one and says which.
    status, drawn = call(server, "/api/generate", {"prompt": "a red circle", "num_images": 2})
    assert status == 200 and isinstance(drawn["seed"], int)
    again = call(server, "/api/generate", {"prompt": "a red circle", "num_images": 2,
                                           "seed": drawn["seed"]})[1]
    assert again["images"] == drawn["images"]


def test_a_negative_prompt_steers_the_requests_images_as_the_pipelines(pipe):
    # Weights moved off their initialisation: the untrained head's zero gates would make
    # every condition (and so every negative prompt) give the same images.
    pipe = fluid.Pipeline(perturbed(pipe.model, jr.key(5)), pipe.text_tokenizer, pipe.config)
    body = {"prompt": "a red circle", "seed": 3, "num_images": 2, "cfg": 3.0,
            "negative_prompt": "a blue square"}
    with running(pipe, max_wait=0.0) as server:
        status, answer = call(server, "/api/generate", body)
        assert status == 200, answer
        plain = pixels(call(server, "/api/generate", {**body, "negative_prompt": ""})[1])
    expected = pipe("a red circle", num_images_per_prompt=2, seed=3, batch_size=1, cfg=3.0,
                    negative_prompt="a blue square")
    images = pixels(answer)
    for got, want in zip(images, expected, strict=True):
        np.testing.assert_array_equal(got, np.asarray(want))
    assert any(not np.array_equal(a, b) for a, b in zip(images, plain))


def test_concurrent_requests_share_one_call_and_keep_their_own_images(pipe, server,
                                                                      monkeypatch):
    calls = []
    sample = batcher_module.sample_images_per_key

    def counted(model, tokenizer, prompts, keys, **kwargs):
        calls.append(list(prompts))
        return sample(model, tokenizer, prompts, keys, **kwargs)

    monkeypatch.setattr(batcher_module, "sample_images_per_key", counted)
    bodies = [{"prompt": "a red circle", "seed": 3}, {"prompt": "a blue square", "seed": 8}]
    # A long wait: the first request is sampled only once the second has joined it.
    with running(pipe, max_wait=120.0) as batched:
        answers = [None, None]

        def ask(i):
            answers[i] = call(batched, "/api/generate", bodies[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert batched.batcher.calls == 1
    assert len(calls) == 1 and sorted(calls[0]) == ["a blue square", "a red circle"]
    alone = []
    for body in bodies:  # each on its own: one call each, the same images
        status, answer = call(server, "/api/generate", body)
        assert status == 200
        alone.append(answer)
    assert len(calls) == 3 and calls[1:] == [["a red circle"] * 2, ["a blue square"] * 2]
    for (status, together), single in zip(answers, alone, strict=True):
        assert status == 200 and together["seed"] == single["seed"]
        assert together["images"] == single["images"]
        assert len(together["images"]) == 1
    assert answers[0][1]["images"] != answers[1][1]["images"]


BAD = [
    (b"{not json", "the body is not JSON"),
    (b"\xff\xfe", "the body is not JSON"),
    (b"[" * 60000, "the body is not JSON"),  # nested too deep for the parser
    (b'["a red circle"]', "send a JSON object"),
    (b"{}", 'give "prompt"'),
    (b'{"prompt": "   "}', "the prompt is empty"),
    (b'{"prompt": "x", "size": 4}', "unknown field(s) 'size'; the fields are prompt"),
    (b'{"prompt": 7}', "prompt must be a string"),
    (b'{"prompt": "x", "steps": 0}', "steps must be from 1 to 16, got 0"),
    (b'{"prompt": "x", "steps": 17}', "the model has 16 tokens"),
    (b'{"prompt": "x", "steps": 2.5}', "steps must be an integer"),
    (b'{"prompt": "x", "steps": true}', "steps must be an integer, got true"),
    (b'{"prompt": "x", "num_images": 3}', "at most --batch-size 2 images per request"),
    (b'{"prompt": "x", "num_images": 0}', "num_images must be from 1 to 2"),
    (b'{"prompt": "x", "seed": -1}', "seed must be from 0 to 4294967295"),
    (b'{"prompt": "x", "seed": 4294967296}', "seed must be from 0 to 4294967295"),
    (b'{"prompt": "x", "cfg": "high"}', 'cfg must be a number, got "high"'),
    (b'{"prompt": "x", "cfg": NaN}', "cfg must be a finite number"),
    (b'{"prompt": "x", "cfg": -1}', "cfg must be at least 0"),
    (b'{"prompt": "x", "temperature": -0.5}', "temperature must be at least 0"),
    (b'{"prompt": "x", "negative_prompt": "blurry", "cfg": 1}', "set cfg above 1"),
    (json.dumps({"prompt": "x" * 2001}).encode(), "give at most 2000"),
    (b" " * (MAX_BODY + 1), f"send at most {MAX_BODY}"),
]


@pytest.mark.parametrize(("body", "says"), BAD, ids=[s[:30] for _, s in BAD])
def test_a_bad_request_is_answered_400_saying_what_to_send(server, body, says):
    calls = server.batcher.calls
    status, answer = call(server, "/api/generate", raw=body)
    assert status == 400 and says in answer["error"], answer
    assert server.batcher.calls == calls  # nothing was sampled


def test_a_class_conditional_model_takes_class_ids_and_names():
    from fluid.config import apply_overrides
    from fluid.text import ClassLabelTokenizer

    config = apply_overrides(tiny_config(), {
        "model.text_encoder": '{"name": "class_labels", "kwargs": {"num_classes": 3, "dim": 32}}',
        "model.text_len": "2",
    })
    tokenizer = ClassLabelTokenizer(3, ["cat", "dog", "fox"])
    model = build_model(config.model, text_tokenizer=tokenizer, key=jr.key(0))
    server = make_server(fluid.Pipeline(model, tokenizer, config), port=0, batch_size=BATCH)
    try:
        assert server.info()["conditioning"] == "class"
        assert server.parse({"prompt": "dog"}).prompt == "1"
        assert server.parse({"prompt": " 2 "}).prompt == "2"
        for prompt, says in [("wolf", "no class named 'wolf'"), ("3", "out of range")]:
            with pytest.raises(BadRequest, match=says):
                server.parse({"prompt": prompt})
    finally:
        server.close()


def test_requests_the_api_does_not_take_are_answered_in_json(server):
    assert call(server, "/api/generate")[0] == 405  # GET
    status, answer = call(server, "/api/generate", raw=b"{}", method="PUT")
    assert status == 501 and "POST /api/generate" in answer["error"]
    status, answer = call(server, "/api/info", raw=b"{}")
    assert status == 404 and "POST to /api/generate" in answer["error"]
    # No Content-Length: refused, not read until the client gives up.
    with socket.create_connection(server.server_address[:2], timeout=30) as connection:
        connection.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b"".join(iter(lambda: connection.recv(4096), b"")).decode()  # until closed
    assert reply.startswith("HTTP/1.1 400") and "Content-Length header" in reply
    # The server still serves after all this.
    client = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    client.request("GET", "/api/info")
    assert client.getresponse().status == 200


def test_a_failed_call_fails_its_requests_and_the_server_goes_on(server, monkeypatch):
    def broken(*args, **kwargs):
        raise FloatingPointError("NaN in the sampler")

    monkeypatch.setattr(batcher_module, "sample_images_per_key", broken)
    # (An empty negative prompt is no negative prompt: the request reaches the sampler.)
    status, answer = call(server, "/api/generate", {"prompt": "x", "negative_prompt": ""})
    assert status == 500 and "FloatingPointError: NaN in the sampler" in answer["error"]
    monkeypatch.undo()
    assert call(server, "/api/info")[0] == 200


# -- the batcher on its own (a stand-in sampler: no compilation) --------------------------------
def test_the_batcher_groups_by_settings_fills_batches_and_refuses_when_closed(pipe, monkeypatch):
    calls = []

    def fake(model, tokenizer, prompts, keys, *, steps, **kwargs):
        calls.append((steps, list(prompts), keys.shape))
        return np.full((len(prompts), 16, 16, 3), steps / 10, np.float32)

    monkeypatch.setattr(batcher_module, "sample_images_per_key", fake)
    batcher = Batcher(pipe, batch_size=4, max_wait=0.0)
    gate = threading.Event()
    started = threading.Event()

    def held(*args, **kwargs):  # the first call waits, so that the rest queue up behind it
        started.set()
        gate.wait()
        return fake(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "sample_images_per_key", held)
    fast, slow = (Settings(steps=s, cfg=3.0, cfg_schedule="linear", temperature=1.0)
                  for s in (2, 5))
    jobs = [Job("first", "", 0, 1, fast), Job("a", "", 1, 3, fast), Job("b", "", 2, 2, slow),
            Job("c", "", 3, 2, fast), Job("d", "", 4, 1, fast)]
    threads = [threading.Thread(target=batcher.submit, args=(jobs[0],))]
    threads[0].start()
    assert started.wait(30)
    monkeypatch.setattr(batcher_module, "sample_images_per_key", fake)
    for queued, job in enumerate(jobs[1:], 1):  # queued in this order
        threads.append(threading.Thread(target=batcher.submit, args=(job,)))
        threads[-1].start()
        while batcher.pending() < queued:
            threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    # Oldest first; "c" (2 images) does not fit beside "a" (3), "d" (1) does; "b" has its own
    # settings; every call samples 4 images (padding).
    assert [(s, p) for s, p, _ in calls] == [
        (2, ["first"] * 4), (2, ["a"] * 3 + ["d"]), (5, ["b"] * 2 + ["b"] * 2),
        (2, ["c"] * 2 + ["c"] * 2),
    ]
    assert all(shape == (4,) for _, _, shape in calls)
    assert [j.images.shape[0] for j in jobs] == [1, 3, 2, 2, 1]
    assert jobs[2].images.max() == pytest.approx(0.5) and jobs[3].images.max() == \
        pytest.approx(0.2)
    batcher.close()
    late = batcher.submit(Job("late", "", 0, 1, fast))
    assert isinstance(late.error, ServerClosed) and late.images is None


def test_closing_refuses_a_job_waiting_for_company(pipe, monkeypatch):
    monkeypatch.setattr(batcher_module, "sample_images_per_key", None)  # never called
    crashed = []
    monkeypatch.setattr(threading, "excepthook", crashed.append)
    batcher = Batcher(pipe, batch_size=4, max_wait=600.0)
    job = Job("a red circle", "", 0, 1, Settings(2, 3.0, "linear", 1.0))
    waiting = threading.Thread(target=batcher.submit, args=(job,))
    waiting.start()
    while batcher.pending() < 1:
        threading.Event().wait(0.01)
    threading.Event().wait(0.5)  # the worker holds the job, waiting for others to join it
    batcher.close()  # returns once the worker has stopped
    waiting.join(30)
    assert not waiting.is_alive() and isinstance(job.error, ServerClosed)
    assert batcher.calls == 0 and crashed == []  # the worker stopped, it did not fail


def test_sample_images_per_key_draws_each_image_as_a_batch_of_its_own(pipe):
    config = pipe.config
    kw = {"text_len": config.model.text_len, "steps": config.sample_steps,
          "cfg": config.sample_cfg, "temperature": config.sample_temperature}
    prompts, keys = ["a blue square", "a red circle"], [jr.key(5), jr.fold_in(jr.key(3), 1)]
    both = sample_images_per_key(pipe.model, pipe.text_tokenizer, prompts, jnp.stack(keys), **kw)
    for image, prompt, key in zip(both, prompts, keys, strict=True):
        alone = sample_images(pipe.model, pipe.text_tokenizer, [prompt], key=key, **kw)
        np.testing.assert_array_equal(image, alone[0])
    with pytest.raises(fluid.ConfigError, match="one key per prompt: 2 prompts"):
        sample_images_per_key(pipe.model, pipe.text_tokenizer, prompts, jnp.stack(keys[:1]),
                              **kw)


def test_image_keys_are_the_seeds_key_then_folds():
    keys = image_keys(7, 3)
    assert keys.shape == (3,)
    want = [jr.key(7), jr.fold_in(jr.key(7), 1), jr.fold_in(jr.key(7), 2)]
    np.testing.assert_array_equal(jr.key_data(keys), jr.key_data(jnp.stack(want)))


# -- the command ---------------------------------------------------------------------------
def test_fluid_serve_prints_its_url_and_stops_on_ctrl_c(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "model")
    code = "import sys; from fluid.cli import main; sys.exit(main())"
    root = str(Path(fluid.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, "serve", str(folder), "--port", "0"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "serving at" in line:
                break
        url = re.search(r"serving at (http://127\.0\.0\.1:\d+/) \(Ctrl-C stops\)", line)
        assert url, "".join(lines)
        with urllib.request.urlopen(url[1] + "api/info", timeout=60) as response:
            assert json.loads(response.read())["image_size"] == 16
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err
    assert "GET /api/info" in err  # one line per request


def test_fluid_serve_refuses_a_busy_port_and_a_bad_one(pipe, tmp_path, capsys):
    folder = pipe.save_pretrained(tmp_path / "model")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(folder), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port}" in err and "give another --port" in err
    with pytest.raises(SystemExit):
        main(["serve", str(folder), "--port", "70000"])
    assert "a port is 0 to 65535" in capsys.readouterr().err


# -- the page itself, in a browser -----------------------------------------------------------
def chromium_dom(url: str, tmp_path: Path) -> str:
    """The page's DOM after its scripts ran, as headless Chromium leaves it."""
    done = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
         "--virtual-time-budget=60000", "--dump-dom", url],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.browser
@pytest.mark.skipif(not _chromium_runs(), reason="needs headless Chromium at /usr/bin/chromium "
                    "(apt-get install chromium)")
def test_the_page_samples_a_prompt_given_in_its_address(server, tmp_path):
    query = urllib.parse.urlencode({"prompt": "a red circle", "seed": 3, "num_images": 2,
                                    "autorun": 1})
    dom = chromium_dom(f"{server.url}?{query}", tmp_path)
    assert 'data-state="done"' in dom, dom[-3000:]
    shown = re.findall(r'<img class="sample"[^>]*src="data:image/png;base64,([^"]+)"', dom)
    # The page showed what the API gives for the same request.
    status, answer = call(server, "/api/generate", {"prompt": "a red circle", "seed": 3,
                                                    "num_images": 2})
    assert status == 200 and shown == answer["images"]
    assert "seed 3" in dom and "a red circle" in dom
    # A request the server refuses shows its message on the page.
    dom = chromium_dom(f"{server.url}?prompt=%20&autorun=1", tmp_path)
    assert 'data-state="error"' in dom and "the prompt is empty" in dom
    assert '<img class="sample"' not in dom

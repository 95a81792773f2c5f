"""The HTTP side: the page, the JSON API, and what a request may ask for."""

import base64
import io
import json
import math
import secrets
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .._errors import ConfigError, UserError
from ..build import count_params
from ..model import sampling_switches
from ..pipeline import Pipeline, to_pil
from ..text import ClassLabelTokenizer
from ._batcher import Batcher, Job, ServerClosed, Settings

PAGE = Path(__file__).with_name("page.html")
MAX_BODY = 64 * 1024  # bytes of a request body: settings and a prompt, never images
MAX_PROMPT = 2000  # characters
SEEDS = 2**32  # `jax.random.key` reads a seed as 32 bits: larger ones would repeat
# What `POST /api/generate` takes: the field, its type, and whether it may be left out.
FIELDS: dict[str, tuple[type, bool]] = {
    "prompt": (str, False),
    "negative_prompt": (str, True),
    "seed": (int, True),
    "steps": (int, True),
    "cfg": (float, True),
    "temperature": (float, True),
    "num_images": (int, True),
}

class BadRequest(Exception):
    """A request that cannot be served; its message says what to send instead."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _checked_value(name: str, value: Any, kind: type) -> Any:
    # JSON has one number type: an integer is a valid float, a bool is never a number.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = {str: "a string", int: "an integer", float: "a number"}[kind]
        raise BadRequest(f"{name} must be {what}, got {json.dumps(value)}.")
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"{name} must be a finite number, got {value}.")
    return value


# `int | float`: the tests' beartype hook refuses an int for a bare `float`.
Number = int | float


def _in_range(name: str, value: Number, low: Number, high: Number | None, hint: str = "") -> None:
    if value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadRequest(f"{name} must be {span}, got {value}{hint}.")


class SamplingServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that serves a `Pipeline`: the page at `/`, the model at
    `/api/info`, images at `/api/generate`. Requests are sampled by a `Batcher`.

    **Arguments:**

    - `address`: `(host, port)`; port 0 takes a free one (`url` says which).
    - `pipeline`: the model to serve (`fluid.load`).
    - `batch_size`: images per sampling call, and the most one request may ask for.
    - `max_wait`: seconds a request waits for others to share its call.
    - `log`: called with one line per request (`None`: no log).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], pipeline: Pipeline, *, batch_size: int = 4,
                 max_wait: float = 0.05, log: Callable[[str], None] | None = None):
        if ":" in address[0]:  # an IPv6 address (`::1`)
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.pipeline = pipeline
        self.log = log
        self.page = PAGE.read_bytes()
        self.batcher = Batcher(pipeline, batch_size=batch_size, max_wait=max_wait)
        config, model = pipeline.config, pipeline.model
        self.defaults = Settings(steps=min(config.sample_steps, model.seq_len),
                                 cfg=float(config.sample_cfg),
                                 cfg_schedule=pipeline.default_cfg_schedule,
                                 temperature=float(config.sample_temperature))
        self.by_class = isinstance(pipeline.text_tokenizer, ClassLabelTokenizer)
        self.parameters = count_params(model)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def close(self) -> None:
        """Stop sampling (queued requests are answered 503) and close the socket. Call
        `shutdown()` first if `serve_forever` runs in another thread."""
        self.batcher.close()
        self.server_close()

    def info(self) -> dict[str, Any]:
        """What `GET /api/info` answers: the model, its defaults and the server's limits."""
        config, model = self.pipeline.config.model, self.pipeline.model
        return {
            "variant": {part: getattr(config, part).name
                        for part in ("tokenizer", "head", "order", "backbone", "text_encoder")},
            "parameters": self.parameters,
            "image_size": model.tokenizer.image_size,
            "tokens": model.seq_len,
            "conditioning": "class" if self.by_class else "text",
            "text_len": config.text_len,
            "defaults": {"steps": self.defaults.steps, "cfg": self.defaults.cfg,
                         "cfg_schedule": self.defaults.cfg_schedule,
                         "temperature": self.defaults.temperature, "num_images": 1},
            "limits": {"steps": [1, model.seq_len], "num_images": [1, self.batcher.batch_size],
                       "seed": [0, SEEDS - 1], "prompt_characters": MAX_PROMPT},
            "negative_prompts": True,
        }

    def parse(self, body: Any) -> Job:
        """The job a `POST /api/generate` body asks for, or `BadRequest` saying what is
        wrong with it."""
        if not isinstance(body, dict):
            raise BadRequest('send a JSON object, such as {"prompt": "a red circle"}.')
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are "
                             f"{', '.join(FIELDS)}.")
        values = {}
        for name, (kind, optional) in FIELDS.items():
            if body.get(name) is None:
                if not optional:
                    raise BadRequest(f'give "{name}", e.g. {{"prompt": "a red circle"}}.')
                continue
            values[name] = _checked_value(name, body[name], kind)
        prompt = self._prompt(values["prompt"])
        # An empty negative prompt is none: the empty caption, which guidance reads anyway.
        negative = values.get("negative_prompt", "").strip()
        negative = self._prompt(negative) if negative else ""
        d, tokens = self.defaults, self.pipeline.model.seq_len
        seed = values.get("seed", secrets.randbelow(SEEDS))
        _in_range("seed", seed, 0, SEEDS - 1)
        steps = values.get("steps", d.steps)
        _in_range("steps", steps, 1, tokens,
                  hint=f" (the model has {tokens} tokens; each step makes at least one)")
        cfg = values.get("cfg", d.cfg)
        _in_range("cfg", cfg, 0, None, hint=" (1: no guidance, 0: unconditional)")
        try:
            sampling_switches(self.pipeline.model.head, cfg=cfg, negative=bool(negative))
        except ConfigError as e:
            raise BadRequest(str(e)) from None
        temperature = values.get("temperature", d.temperature)
        _in_range("temperature", temperature, 0, None)
        num_images = values.get("num_images", 1)
        _in_range("num_images", num_images, 1, self.batcher.batch_size,
                  hint=" (this server samples at most --batch-size "
                  f"{self.batcher.batch_size} images per request: ask for fewer, or restart it "
                  "with a larger --batch-size)")
        return Job(prompt=prompt, negative_prompt=negative, seed=seed,
                   num_images=num_images,
                   settings=Settings(steps=steps, cfg=cfg, cfg_schedule=d.cfg_schedule,
                                     temperature=temperature))

    def _prompt(self, prompt: str) -> str:
        """The caption as the model reads it: a class-conditional model's class id for a
        class name."""
        text = prompt.strip()
        if not text:
            raise BadRequest("the prompt is empty: describe the image (for a class-conditional "
                             "model, a class id or name).")
        if len(text) > MAX_PROMPT:
            raise BadRequest(f"the prompt has {len(text)} characters; give at most "
                             f"{MAX_PROMPT} (the model reads "
                             f"{self.pipeline.config.model.text_len} tokens).")
        tokenizer = self.pipeline.text_tokenizer
        try:
            if self.by_class:
                text = str(tokenizer.label(text))
            tokenizer.encode([text], self.pipeline.config.model.text_len)
        except (UserError, ValueError) as error:
            raise BadRequest(str(error)) from None
        return text


def make_server(pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 0,
                batch_size: int = 4, max_wait: float = 0.05,
                log: Callable[[str], None] | None = None) -> SamplingServer:
    """A `SamplingServer` bound to `host:port` (not yet serving: call `serve_forever`)."""
    try:
        return SamplingServer((host, port), pipeline, batch_size=batch_size, max_wait=max_wait,
                              log=log)
    except FileNotFoundError:  # the page is missing: a broken install, not the address
        raise
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}; give "
                        "another --port (0: any free one) or --host.") from None


class _Handler(BaseHTTPRequestHandler):
    server: SamplingServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(HTTPStatus.OK, self.server.info())
        elif path == "/api/generate":
            self._error(BadRequest("POST a JSON object to /api/generate.",
                                   HTTPStatus.METHOD_NOT_ALLOWED))
        else:
            self._error(BadRequest(f"no page {path}; the page is /, the API /api/info and "
                                   "/api/generate.", HTTPStatus.NOT_FOUND))

    def do_POST(self) -> None:
        started = time.monotonic()
        try:
            if self.path.split("?", 1)[0] != "/api/generate":
                raise BadRequest(f"nothing to POST at {self.path}; POST to /api/generate.",
                                 HTTPStatus.NOT_FOUND)
            job = self.server.parse(self._body())
            self.server.batcher.submit(job)
            if job.error is not None:
                raise job.error
            assert job.images is not None
            images = [base64.b64encode(_png(image)).decode("ascii")
                      for image in to_pil(job.images)]
            self._json(HTTPStatus.OK, {"images": images, "seed": job.seed,
                                       "seconds": round(time.monotonic() - started, 3)})
        except BadRequest as error:
            self._error(error)
        except UserError as error:
            self._error(BadRequest(str(error)))
        except ServerClosed as error:
            self._error(BadRequest(str(error), HTTPStatus.SERVICE_UNAVAILABLE))
        except Exception as error:  # noqa: BLE001 (the request fails; the server goes on)
            self._error(BadRequest(f"sampling failed: {type(error).__name__}: {error}",
                                   HTTPStatus.INTERNAL_SERVER_ERROR))

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None:
            self.close_connection = True
            raise BadRequest("send the JSON body with a Content-Length header.")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise BadRequest(f"Content-Length must be a number, got {length!r}.") from None
        if not 0 <= size <= MAX_BODY:
            if MAX_BODY < size <= 16 * MAX_BODY:
                self.rfile.read(size)  # read, so that the client reads the answer
            else:
                self.close_connection = True  # the body stays unread
            raise BadRequest(f"the body has {size} bytes; send at most {MAX_BODY} (a prompt "
                             "and its settings).")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise BadRequest(f"the body is not JSON ({error}); send an object such as "
                             '{"prompt": "a red circle", "seed": 0}.') from None

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        # What the standard library refuses itself (a malformed request line, a method
        # without a `do_` handler) is answered in JSON too.
        del explain
        self.close_connection = True
        status = HTTPStatus(code)
        self._json(status, {"error": f"{message or status.phrase}; use GET / or /api/info, or "
                            "POST /api/generate."})

    def _error(self, error: BadRequest) -> None:
        self._json(error.status, {"error": str(error)})

    def _json(self, status: HTTPStatus, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the client left; nothing to tell it
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log is not None:
            self.server.log(f"{self.address_string()} {format % args}")


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def serve(pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 8000,
          batch_size: int = 4, max_wait: float = 0.05, log: Callable[[str], None] | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve `pipeline` until Ctrl-C, then stop cleanly: the call being sampled finishes,
    queued requests are answered 503, the socket is closed. `ready(url)` is called once the
    server listens."""
    server = make_server(pipeline, host=host, port=port, batch_size=batch_size,
                         max_wait=max_wait, log=log)
    try:
        if ready is not None:
            ready(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()

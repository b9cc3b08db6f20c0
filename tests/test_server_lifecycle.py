"""Server lifecycle with real processes: the launcher owns the server's process group, refuses a
busy port, does not take an orphan answering on the port for its server, and ``recipes/serve.py``
stops the whole group on SIGTERM (fast tests use small stand-in processes; the slow one a real
vLLM server). ``tests/test_serving_rank.py`` ends with ``kill -9`` of a real API server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

# a stand-in "API server": answers /health and /v1/sid/info (with its own token) and, like vLLM's
# API server, has a child process (the "engine") that outlives it when it is killed with SIGKILL
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, json, os, subprocess, sys
    port, token = int(sys.argv[1]), sys.argv[2]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"launch_token": token, "pid": os.getpid()}).encode()
            self.send_response(200); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    print(child.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_fake(tmp_path: Path, port: int, token: str) -> subprocess.Popen:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), token],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    proc.child_pid = int(proc.stdout.readline())  # type: ignore[attr-defined]
    return proc


def fake_checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sidrec").mkdir(parents=True)
    (ckpt / "sidrec" / "meta.json").write_text("{}")
    return ckpt


def test_orphan_on_the_port_is_not_taken_for_the_new_server(tmp_path):
    from recipes.server import ServerConfig, ServerHandle, free_port, launch, port_in_use, wait_for_health

    port = free_port()
    orphan = start_fake(tmp_path, port, token="an-earlier-launch")
    try:
        deadline = time.monotonic() + 30
        while not port_in_use("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.1)
        cfg = ServerConfig(checkpoint=str(fake_checkpoint(tmp_path)), port=port)
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            launch(cfg)
        # had the port check been raced: the answer on /health is not this launch's
        ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        handle = ServerHandle(ours, cfg, tmp_path / "log")
        with pytest.raises(RuntimeError, match="not the one just launched.*an-earlier-launch"):
            wait_for_health(handle, timeout=30, poll=0.2)
        handle.stop(timeout=5)
        assert ours.poll() is not None and not group_alive(ours.pid)
    finally:
        os.killpg(orphan.pid, signal.SIGKILL)
        orphan.wait()


def test_handle_ends_the_processes_a_killed_server_leaves(tmp_path):
    from recipes.server import ServerConfig, ServerHandle, free_port

    port = free_port()
    fake = start_fake(tmp_path, port, token="t")
    handle = ServerHandle(fake, ServerConfig(checkpoint="x", port=port), tmp_path / "log")
    os.kill(fake.pid, signal.SIGKILL)  # the "API server" dies; its "engine" child stays in the group
    time.sleep(0.5)
    assert os.path.exists(f"/proc/{fake.child_pid}") and group_alive(fake.pid)
    assert handle.wait() == -signal.SIGKILL
    assert not group_alive(fake.pid) and not os.path.exists(f"/proc/{fake.child_pid}")


def test_server_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    """``launch`` starts the server with PR_SET_PDEATHSIG: kill -9 of the launching process
    (e.g. ``recipes/serve.py``) still ends the server, here a stand-in that records SIGTERM."""
    mark = tmp_path / "got_sigterm"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(mark)!r}).write_text('x'), sys.exit(0)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = (
        "import subprocess, sys, time\n"
        "from recipes.server import _die_with_parent\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True,\n"
        "                     start_new_session=True, preexec_fn=_die_with_parent)\n"
        "p.stdout.readline()\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    server_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark.exists(), "the server did not get SIGTERM when its launcher died"
    deadline = time.monotonic() + 10
    while group_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_alive(server_pid)


@pytest.mark.slow
def test_sigterm_to_serve_py_stops_the_whole_server(tiny_sft, tmp_path):
    from recipes.server import free_port

    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "recipes/serve.py", "--config", "recipes/configs/serve_demo.yaml",
           "--checkpoint", str(tiny_sft / "final"), "--port", str(port), "--log_file", str(tmp_path / "vllm.log")]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)}
        )
    try:
        deadline = time.monotonic() + 900
        while "serving " not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(2)
        api = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d) == proc.pid]
        assert len(api) == 1, api
        pgid = api[0]
        assert group_alive(pgid) and len(_group(pgid)) >= 2  # API server + EngineCore at least
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0, log.read_text()[-3000:]
        assert not group_alive(pgid), f"left behind: {_group(pgid)}"
        assert "SIGTERM: server stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def _ppid(d: Path) -> int | None:
    try:
        return int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _group(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out

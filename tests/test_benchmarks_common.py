"""benchmarks/common.py: the machine description every benchmark writes into its JSON and report."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from benchmarks.common import cpu_model, describe_machine, machine_info, memory_gib
from data_prep.provenance import run_info


def test_machine_info_extends_run_info_and_is_json():
    info = machine_info()
    assert set(run_info()) <= set(info)
    assert info["versions"]["torch"] and info["cpu_count"] == os.cpu_count()
    assert 1 <= info["cores_usable"] <= info["cpu_count"]
    assert dt.datetime.fromisoformat(info["date"]).tzinfo is not None
    assert isinstance(info["gpus"], list)
    if Path("/proc/meminfo").exists():
        assert 0 < info["memory_gib"]["available"] <= info["memory_gib"]["total"]
    if Path("/proc/cpuinfo").exists() and "model name" in Path("/proc/cpuinfo").read_text():
        assert info["cpu_model"]
    assert json.loads(json.dumps(info)) == info


def test_proc_parsers_read_the_fields_and_survive_missing_files(tmp_path: Path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: x\n")
    assert cpu_model(tmp_path / "cpuinfo") == "Example CPU 9000"
    (tmp_path / "meminfo").write_text(
        "MemTotal:       25165824 kB\nMemFree: 1 kB\nMemAvailable:   12582912 kB\n"
    )
    assert memory_gib(tmp_path / "meminfo") == {"total": 24.0, "available": 12.0}
    assert cpu_model(tmp_path / "none") is None and memory_gib(tmp_path / "none") is None


def test_describe_machine_names_cores_memory_gpu_load_threads_versions():
    info = {
        **run_info(),
        "cores_usable": 2,
        "cpu_model": "Example CPU",
        "memory_gib": {"total": 24.0, "available": 20.0},
        "gpus": [],
        "load_average": [3.5, 2.0, 1.25],
        "date": "2026-12-03T08:00:00+00:00",
    }
    text = describe_machine(info)
    assert text.startswith("2 CPU cores (Example CPU), 24 GiB RAM, no GPU; load average 3.50 / 2.00 / 1.25")
    assert f"torch {info['versions']['torch']}" in text and text.endswith("2026-12-03T08:00:00+00:00")
    info["gpus"] = [{"name": "NVIDIA H200", "memory_gib": 139.8}]
    assert "NVIDIA H200 (139.8 GiB)" in describe_machine(info)

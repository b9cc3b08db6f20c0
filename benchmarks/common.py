"""The machine and software a benchmark ran on, recorded the same way by every benchmark.

``machine_info()`` is ``data_prep.provenance.run_info()`` (Python, package versions, torch and
OpenMP threads, CPU count) plus what a figure on a shared or borrowed machine also depends on:
CPU model, memory, GPUs, the load average when it was taken, and the date. Every script under
``benchmarks/`` stores it as ``"machine"`` in the JSON it writes and renders it with
``describe_machine`` in its Markdown, so two results can be compared for the machine first.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.provenance import run_info

if TYPE_CHECKING:
    from trl import ModelConfig, SFTConfig

    from recipes.args import SidSFTArgs


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first ``model name`` of /proc/cpuinfo (None where there is no such file or line)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def memory_gib(meminfo: Path = Path("/proc/meminfo")) -> dict[str, float] | None:
    """Total and available memory in GiB from /proc/meminfo (None where it cannot be read)."""
    out = {}
    try:
        with open(meminfo, encoding="utf-8") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = round(int(rest.split()[0]) / 2**20, 1)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in out:
        return None
    return {"total": out["MemTotal"], "available": out.get("MemAvailable", out["MemTotal"])}


def gpus() -> list[dict[str, Any]]:
    """Name and memory of each CUDA device torch sees ([] without torch, CUDA or a GPU)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return out


def machine_info() -> dict[str, Any]:
    """JSON-serialisable description of this process's machine, software and load, now."""
    info = run_info()
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores_usable = info["cpu_count"]
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    try:
        import torch

        cuda = torch.version.cuda
    except ImportError:
        cuda = None
    info.update(
        cpu_model=cpu_model(),
        cores_usable=cores_usable,
        memory_gib=memory_gib(),
        gpus=gpus(),
        cuda=cuda,
        load_average=load,
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    return info


def describe_machine(
    info: dict[str, Any], packages: tuple[str, ...] = ("torch", "transformers", "trl")
) -> str:
    """One sentence for a report: cores, CPU, memory, GPUs, load, threads, versions, date."""
    mem = info.get("memory_gib")
    gpu = ", ".join(f"{g['name']} ({g['memory_gib']:g} GiB)" for g in info.get("gpus") or []) or "no GPU"
    load = info.get("load_average")
    versions = info.get("versions", {})
    parts = [
        f"{info['cores_usable']} CPU cores ({info.get('cpu_model') or 'unknown CPU'})",
        f"{mem['total']:g} GiB RAM" if mem else "RAM unknown",
        gpu,
    ]
    text = ", ".join(parts)
    if load:
        text += (
            f"; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min, other jobs included)"
        )
    text += f"; torch threads {info.get('torch_threads')}, OMP_NUM_THREADS={info.get('omp_num_threads') or 'unset'}"
    shown = [f"{p} {versions[p]}" for p in packages if p in versions]
    text += f"; Python {info['python']}" + (", " + ", ".join(shown) if shown else "")
    return text + f"; {info['date']}"


def parse_sft_recipe(path: str | Path, *overrides: str) -> tuple[SidSFTArgs, SFTConfig, ModelConfig]:
    """``(SidSFTArgs, SFTConfig, ModelConfig)`` exactly as ``recipes/sft.py`` parses
    ``--config path`` followed by the CLI-style ``overrides`` (same parser, same defaults)."""
    from trl import ModelConfig, SFTConfig, TrlParser

    from recipes.args import SidSFTArgs

    parser = TrlParser((SidSFTArgs, SFTConfig, ModelConfig))
    return tuple(parser.parse_args_and_config(["--config", str(path), *overrides]))


def stage_env(threads: int, root: Path, **extra: str) -> dict[str, str]:
    """Environment of a benchmark's stage subprocess: ``threads`` OpenMP/MKL threads, no tokenizer
    threads, ``root`` first on ``PYTHONPATH`` (the caller's entries kept), plus ``extra``."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **extra,
    }


def evaluate_cmd(
    config: str | Path, checkpoint: str | Path, splits: list[str], model_name: str, output_dir: str | Path
) -> list[str]:
    """``python -m eval.evaluate`` of ``checkpoint`` on ``splits`` (constrained beam search only)."""
    cmd = [sys.executable, "-m", "eval.evaluate", "--config", str(config), "--checkpoint", str(checkpoint)]
    cmd += ["--splits", *splits, "--also_unconstrained", "false"]
    return cmd + ["--model_name", model_name, "--output_dir", str(output_dir)]

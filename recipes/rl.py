"""RL after SFT: GRPO or DPO on an SFT checkpoint, inside the catalogue.

    python recipes/rl.py --config recipes/configs/grpo_scientific.yaml
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl.py --config recipes/configs/dpo_scientific.yaml

``algorithm: grpo | dpo`` picks the trainer and its config class (GRPOConfig / DPOConfig, parsed
with the script args and ModelConfig). ``model_name_or_path`` is an SFT ``final`` dir.
Prompts: the raw seq2seq prompt (what ``eval.evaluate`` ranks with) of a sampled prefix of a
user's training sequence; target = the next item. GRPO: constrained rollouts (sampled, or the
G distinct items of a constrained beam search), rule-based rewards from ``eval.rewards``.
DPO: pairs mined once from the SFT model (chosen = true next item, rejected = its top-ranked
wrong items), cached in ``<output_dir>/pairs_*.jsonl``. Both: log-probs under the SID
constraint, HR/NDCG on validation users at each eval (checkpoint selection), final model +
``sidrec/`` catalogue, training curves PNG.

Killed at any point (kill -9), the same command resumes: leftovers of interrupted writes and
checkpoints whose save was cut short are removed, training resumes from the last complete
checkpoint (a run that had already finished is not trained further), the pairs cache and
``final/`` are written atomically (``final/`` is staged in ``.final.partial`` and renamed).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset
from trl import DPOConfig, GRPOConfig, ModelConfig, TrlParser, get_peft_config

from data_prep.dataset import RecDataset
from data_prep.io import atomic_write_json, atomic_write_jsonl, iter_jsonl, read_json
from eval.rewards import RewardContext, bind_rewards
from eval.rl import (
    SidDPOTrainer,
    SidGRPOTrainer,
    example_rows,
    mine_preference_pairs,
    plot_rl_curves,
    rl_prompt_rows,
    sasrec_item_scorer,
)
from eval.training import already_finished, prepare_output_dir, save_final, train_or_finish
from sid_tokenizer.llm import Catalogue

logger = logging.getLogger(__name__)

CONFIGS = {"grpo": GRPOConfig, "dpo": DPOConfig}


@dataclass
class RLScriptArgs:
    algorithm: str = field(default="grpo", metadata={"help": "grpo | dpo"})
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "dataset dir (default: the one recorded in <model_name_or_path>/sidrec/meta.json)"},
    )
    max_history: int = 20
    prompt_format: str = field(default="seq2seq", metadata={"help": "seq2seq (raw, as evaluated) | chat"})
    num_train_prompts: int = field(
        default=2000, metadata={"help": "RL prompts drawn from the training sequences"}
    )
    prefix_sampling: str = field(
        default="uniform",
        metadata={
            "help": "uniform: cut each sequence at a random position | last: predict its last training item"
        },
    )
    eval_prompts: int = field(
        default=64, metadata={"help": "validation users for eval reward / DPO eval loss"}
    )
    # GRPO
    rollout: str = field(default="beam", metadata={"help": "beam: G distinct beams per prompt | sample"})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact", "rank"],
        metadata={"help": "names in eval.rewards.REWARDS; weights: reward_weights"},
    )
    constrain_logprobs: bool = field(
        default=True, metadata={"help": "log-probs (policy, reference, DPO margins) under the SID constraint"}
    )
    collaborative_sasrec_epochs: int = field(
        default=50, metadata={"help": "SASRec epochs for 'collaborative'"}
    )
    # DPO
    num_negatives: int = field(default=3, metadata={"help": "rejected items per prompt (one pair each)"})
    mining_beams: int = field(default=10, metadata={"help": "beams ranked when mining negatives"})
    mining_batch_size: int = 32
    # ranking eval during training (eval.training.RankingEvalMixin)
    rank_eval_users: int = field(
        default=300, metadata={"help": "validation users ranked at each eval (0: off)"}
    )
    rank_eval_beams: int = 20
    seed_data: int = 0


def parse_args(argv: list[str] | None = None) -> tuple[RLScriptArgs, GRPOConfig | DPOConfig, ModelConfig]:
    """Read ``algorithm`` first (YAML or CLI), then parse everything with its config class."""
    (pre, _) = TrlParser((RLScriptArgs,)).parse_args_and_config(argv, return_remaining_strings=True)
    if pre.algorithm not in CONFIGS:
        raise ValueError(f"algorithm must be one of {sorted(CONFIGS)}, got {pre.algorithm!r}")
    parser = TrlParser((RLScriptArgs, CONFIGS[pre.algorithm], ModelConfig))
    return parser.parse_args_and_config(argv)


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


def main(script_args: RLScriptArgs, training_args: GRPOConfig | DPOConfig, model_args: ModelConfig) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = Path(model_args.model_name_or_path)
    if not (sft / "sidrec" / "meta.json").exists():
        raise FileNotFoundError(
            f"{sft}: model_name_or_path must be a sidrec checkpoint (an SFT final dir with sidrec/)"
        )
    catalogue = Catalogue.load(sft)
    index = catalogue.index
    dataset_dir = script_args.dataset_dir or read_json(sft / "sidrec" / "meta.json")["dataset_dir"]
    dataset = RecDataset.load(dataset_dir)
    if len(index) != dataset.num_items:
        raise ValueError(
            f"{sft}/sidrec has {len(index)} items, dataset {dataset_dir} has {dataset.num_items}"
        )
    out = Path(training_args.output_dir)
    last, done = prepare_output_dir(training_args)
    final = out / "final"
    if already_finished(last, done, final):
        if training_args.process_index == 0:
            plot_rl_curves(
                done["log_history"], out / "training_curves.png", title=f"{script_args.algorithm} from {sft}"
            )
        return

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForCausalLM.from_pretrained(
        sft, dtype=dtype, attn_implementation=model_args.attn_implementation
    )

    train_rows = rl_prompt_rows(
        index,
        dataset.train,
        script_args.num_train_prompts,
        script_args.max_history,
        script_args.prefix_sampling,
        script_args.prompt_format,
        seed=script_args.seed_data,
    )
    eval_rows = example_rows(
        index, dataset.valid[: script_args.eval_prompts], script_args.max_history, script_args.prompt_format
    )
    rank_eval = (dataset, index, dataset.valid, script_args) if script_args.rank_eval_users > 0 else None
    common = dict(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        catalogue_index=index,
        constrain_logprobs=script_args.constrain_logprobs,
        rank_eval=rank_eval,
    )

    if script_args.algorithm == "grpo":
        # a completion is L SID tokens + EOS; the constraint forces EOS after the last level
        training_args.max_completion_length = index.vocab.num_levels + 1
        scorer = None
        if "collaborative" in script_args.reward_funcs:
            scorer = sasrec_item_scorer(
                dataset, seed=training_args.seed, epochs=script_args.collaborative_sasrec_epochs
            )
        trainer = SidGRPOTrainer(
            reward_funcs=bind_rewards(script_args.reward_funcs, RewardContext(index, item_scorer=scorer)),
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            rollout=script_args.rollout,
            **common,
        )
    else:

        def mine(rows):
            return lambda: mine_preference_pairs(
                model,
                tokenizer,
                index,
                rows,
                script_args.num_negatives,
                script_args.mining_beams,
                script_args.mining_batch_size,
            )

        def pairs(name, rows):
            return mined_pairs(
                out / name,
                training_args,
                rows,
                mine(rows),
                script_args.num_negatives,
                script_args.mining_beams,
            )

        train_pairs = pairs("pairs_train.jsonl", train_rows)
        eval_pairs = pairs("pairs_eval.jsonl", eval_rows) if eval_rows else []
        logger.info(
            "DPO pairs: %d train (%d prompts), %d eval", len(train_pairs), len(train_rows), len(eval_pairs)
        )
        keep = ["prompt", "chosen", "rejected"]
        trainer = SidDPOTrainer(
            train_dataset=Dataset.from_list([{k: p[k] for k in keep} for p in train_pairs]),
            eval_dataset=Dataset.from_list([{k: p[k] for k in keep} for p in eval_pairs])
            if eval_pairs
            else None,
            **common,
        )

    atomic_write_json(
        out / "rl_meta.json",
        {
            "stage": "recipes.rl",
            "sft_checkpoint": str(sft),
            "dataset_dir": dataset_dir,
            "script_args": asdict(script_args),
            "train_prompts": len(train_rows),
            "eval_prompts": len(eval_rows),
        },
    )
    train_or_finish(trainer, last, done)
    save_final(trainer, tokenizer, sft, final)
    if trainer.accelerator.is_main_process:
        plot_rl_curves(
            trainer.state.log_history,
            out / "training_curves.png",
            title=f"{script_args.algorithm} from {sft}",
        )
    logger.info("saved %s", final)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse_args())

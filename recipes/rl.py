"""RL after SFT: GRPO or DPO on an SFT checkpoint, inside the catalogue.

    python recipes/rl.py --config recipes/configs/grpo_scientific.yaml
    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/rl.py --config recipes/configs/dpo_scientific.yaml

``algorithm: grpo | dpo`` picks the trainer and its config class (GRPOConfig / DPOConfig, parsed
with the script args and ModelConfig). ``model_name_or_path`` is an SFT ``final`` dir. Prompts:
a sampled prefix of a user's training sequence -> the next item (``recipes.rl_data``). GRPO:
constrained rollouts, rule-based rewards (``recipes.grpo``, ``recipes.rewards``); DPO: pairs
mined once from the SFT model and cached (``recipes.dpo``). Killed at any point (kill -9), the
same command resumes from the last complete checkpoint (``recipes.training``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, GRPOConfig, ModelConfig, get_peft_config

from data_prep.dataset import RecDataset
from data_prep.io import atomic_write_json
from data_prep.provenance import run_info
from recipes.args import RLScriptArgs, parse_rl_args
from recipes.dpo import SidDPOTrainer, dpo_pairs
from recipes.grpo import SidGRPOTrainer
from recipes.rewards import RewardContext, bind_rewards, sasrec_item_scorer
from recipes.rl_data import rl_rows
from recipes.training import (
    already_finished,
    plot_training_curves,
    prepare_output_dir,
    save_final_or_start,
    start_metrics,
    train_or_finish,
)
from sid_tokenizer.catalog import Catalogue, checkpoint_dataset_dir

logger = logging.getLogger(__name__)


def main(script_args: RLScriptArgs, training_args: GRPOConfig | DPOConfig, model_args: ModelConfig) -> None:
    sft = Path(model_args.model_name_or_path)
    index = Catalogue.load(sft).index
    dataset_dir = checkpoint_dataset_dir(sft, script_args.dataset_dir)
    dataset = RecDataset.load(dataset_dir)
    if len(index) != dataset.num_items:
        raise ValueError(
            f"{sft}/sidrec has {len(index)} items, dataset {dataset_dir} has {dataset.num_items}"
        )
    out, title = Path(training_args.output_dir), f"{script_args.algorithm} from {sft}"
    last, done = prepare_output_dir(training_args)
    if already_finished(last, done, out / "final"):
        if training_args.process_index == 0:
            plot_training_curves(done["log_history"], out / "training_curves.png", title=title)
        return

    tokenizer = AutoTokenizer.from_pretrained(sft)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        sft, dtype=model_args.dtype or "auto", attn_implementation=model_args.attn_implementation
    )
    a = script_args
    train_rows, eval_rows = rl_rows(index, dataset, a)
    common = dict(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        catalogue_index=index,
        constrain_logprobs=a.constrain_logprobs,
        rank_eval=(dataset, index, dataset.valid, a) if a.rank_eval_users > 0 else None,
    )
    if a.algorithm == "grpo":
        # a completion is L SID tokens + EOS; the constraint forces EOS after the last level
        training_args.max_completion_length = index.vocab.num_levels + 1
        scorer = None
        if "collaborative" in a.reward_funcs:
            scorer = sasrec_item_scorer(
                dataset, seed=training_args.seed, epochs=a.collaborative_sasrec_epochs
            )
        trainer = SidGRPOTrainer(
            reward_funcs=bind_rewards(a.reward_funcs, RewardContext(index, item_scorer=scorer)),
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            rollout=a.rollout,
            **common,
        )
    else:
        train_ds, eval_ds = dpo_pairs(out, training_args, model, tokenizer, index, train_rows, eval_rows, a)
        trainer = SidDPOTrainer(train_dataset=train_ds, eval_dataset=eval_ds, **common)

    meta = {
        "stage": "recipes.rl",
        "sft_checkpoint": str(sft.resolve()),
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "script_args": asdict(a),
        "train_prompts": len(train_rows),
        "eval_prompts": len(eval_rows),
        **run_info(),
    }
    atomic_write_json(out / "rl_meta.json", meta)
    start = start_metrics(trainer, out) if a.keep_start_if_better else None
    train_or_finish(trainer, last, done)
    selection = save_final_or_start(trainer, tokenizer, sft, out / "final", start)
    if trainer.accelerator.is_main_process:
        atomic_write_json(out / "rl_meta.json", {**meta, "selection": selection})
        plot_training_curves(trainer.state.log_history, out / "training_curves.png", title=title)
    logger.info("saved %s", out / "final")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(*parse_rl_args())

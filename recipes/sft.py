"""Supervised fine-tuning: a decoder-only LLM learns to read and write Semantic IDs.

    accelerate launch --config_file accelerate_configs/cpu.yaml recipes/sft.py --config recipes/configs/sft_scientific.yaml
    python recipes/sft.py --config recipes/configs/sft_scientific.yaml --max_steps 50

Parse -> base checkpoint with SID tokens (built once, reused on resume) -> task mixture ->
SFTTrainer (with HR/NDCG from constrained beam search on validation users at each eval) ->
train (resuming from the last checkpoint) -> save model, tokenizer and the catalogue.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from datasets import Dataset
from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from data_prep.dataset import RecDataset
from recipes.args import SidSFTArgs
from recipes.model import add_training_dropout, prepare_base_checkpoint, untie_word_embeddings
from recipes.sft_trainer import SidSFTTrainer, trainable_sid_rows_only
from recipes.sid_loss import SidLevels
from recipes.tasks import build_mixture, eval_rows, tokenize_rows
from recipes.training import (
    CatalogueCallback,
    already_finished,
    plot_training_curves,
    prepare_output_dir,
    save_final,
    train_or_finish,
)
from sid_tokenizer.catalog import load_sid_dir

logger = logging.getLogger(__name__)


def main(script_args: SidSFTArgs, training_args: SFTConfig, model_args: ModelConfig) -> None:
    if script_args.rank_eval_users <= 0 and "@" in (training_args.metric_for_best_model or ""):
        logger.warning(
            "rank_eval_users=0: selecting checkpoints on eval_loss instead of %s",
            training_args.metric_for_best_model,
        )
        training_args.metric_for_best_model, training_args.greater_is_better = "eval_loss", False
    state = training_args.distributed_state
    logger.info(
        "process %d of %d (%s, backend %s)",
        *(state.process_index, state.num_processes, state.distributed_type, state.backend),
    )
    dataset = RecDataset.load(script_args.dataset_dir)
    index = load_sid_dir(script_args.sid_dir, dataset)
    out = Path(training_args.output_dir)
    last, done = prepare_output_dir(training_args)
    final = out / "final"
    if already_finished(last, done, final):
        if training_args.process_index == 0:
            plot_training_curves(done["log_history"], out / "training_curves.png")
        return
    # built by one process, then reused by the others (concurrent builds would replace the
    # directory under a rank that is reading it); per node only when nodes do not share the disk
    with training_args.main_process_first(local=training_args.save_on_each_node, desc="base checkpoint"):
        base = prepare_base_checkpoint(
            out / "base",
            dataset,
            index,
            model_args.model_name_or_path,
            preset=script_args.model_preset,
            sid_init=script_args.sid_embedding_init,
            seed=training_args.seed,
            sid_dir=script_args.sid_dir,
            dataset_dir=script_args.dataset_dir,
            chat_template=script_args.chat_template,
        )

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    quantization_config = get_quantization_config(model_args)
    model = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=model_args.dtype if model_args.dtype not in (None, "auto") else "auto",
        attn_implementation=model_args.attn_implementation,
        quantization_config=quantization_config,
    )
    if script_args.untie_word_embeddings and untie_word_embeddings(model):
        logger.info("untied the output layer from the input embeddings")
    if script_args.train_only_sid_embeddings:
        trainable_sid_rows_only(model, tokenizer, index.vocab)
    add_training_dropout(model, script_args.embedding_dropout, script_args.residual_dropout)

    rows = build_mixture(
        dataset,
        index,
        script_args.tasks,
        tokenizer,
        seed=script_args.seed_data,
        max_history=script_args.max_history,
        include_valid=script_args.include_valid_in_train,
    )
    train_ds = Dataset.from_dict(tokenize_rows(rows, tokenizer, training_args.max_length or 512))
    valid = dataset.valid[: script_args.max_eval_loss_users]
    valid_rows = eval_rows(dataset, index, valid, script_args.max_history)
    eval_ds = Dataset.from_dict(tokenize_rows(valid_rows, tokenizer, training_args.max_length or 512))
    logger.info("task mixture rows: %s", dict(Counter(r["task"] for r in rows)))

    trainer = SidSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds.remove_columns("task"),
        eval_dataset=eval_ds.remove_columns("task"),
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[CatalogueCallback(base)],
        rank_eval=(dataset, index, dataset.valid, script_args) if script_args.rank_eval_users > 0 else None,
        sid_levels=SidLevels.from_tokenizer(tokenizer, index.vocab)
        if script_args.sid_restricted_loss
        else None,
    )
    train_or_finish(trainer, last, done)
    save_final(trainer, tokenizer, base, final)
    if trainer.accelerator.is_main_process:
        plot_training_curves(trainer.state.log_history, out / "training_curves.png")
    logger.info("saved %s", final)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = TrlParser((SidSFTArgs, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())

"""Script arguments of the recipes (open-r1's ``configs.py``): dataclasses parsed by ``trl.TrlParser``
together with TRL's own configs (``SFTConfig`` / ``GRPOConfig`` / ``DPOConfig``, ``ModelConfig``)
from a YAML recipe plus CLI overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig, GRPOConfig, ModelConfig, TrlParser


@dataclass
class SidSFTArgs:
    dataset_dir: str = field(default="outputs/scientific/dataset", metadata={"help": "data_prep output"})
    sid_dir: str = field(default="outputs/scientific/sid_rkmeans", metadata={"help": "sid_tokenizer output"})
    model_preset: str = field(default="small", metadata={"help": "size of the offline default model"})
    tasks: dict[str, float] = field(
        default_factory=lambda: {"seq2seq": 1.0},
        metadata={"help": "task -> weight (rows per source unit), see recipes.tasks.TASKS"},
    )
    max_history: int = 20
    include_valid_in_train: bool = field(
        default=False,
        metadata={"help": "train on the validation targets too (final model for test; select steps first)"},
    )
    sid_embedding_init: str = field(default="mean", metadata={"help": "mean | random"})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "chatml or a .jinja file: installed if the base tokenizer has no chat template"},
    )
    train_only_sid_embeddings: bool = field(
        default=False, metadata={"help": "freeze everything but the new SID token rows (MiniOneRec's option)"}
    )
    rank_eval_users: int = field(
        default=500, metadata={"help": "validation users ranked at each eval (0: off)"}
    )
    rank_eval_beams: int = 20
    max_eval_loss_users: int = 2000
    seed_data: int = 0
    sid_restricted_loss: bool = field(
        default=False,
        metadata={
            "help": "softmax over the label's SID level only at SID positions (recipes.sid_loss); text keeps the full vocabulary"
        },
    )
    untie_word_embeddings: bool = field(
        default=False,
        metadata={
            "help": "give a tied model its own output layer (a copy of the embeddings) before training"
        },
    )
    embedding_dropout: float = field(
        default=0.0, metadata={"help": "training-only dropout on the token embeddings"}
    )
    residual_dropout: float = field(
        default=0.0,
        metadata={"help": "training-only dropout on each attention/MLP branch output (Qwen2 has none)"},
    )


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
        metadata={"help": "names in recipes.rewards.REWARDS; weights: reward_weights"},
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
    # ranking eval during training (recipes.training.RankingEvalMixin)
    rank_eval_users: int = field(
        default=300, metadata={"help": "validation users ranked at each eval (0: off)"}
    )
    rank_eval_beams: int = 20
    keep_start_if_better: bool = field(
        default=True,
        metadata={
            "help": "the start (SFT) model is a candidate too: when no RL checkpoint beats its "
            "metric_for_best_model on the rank-eval users, final/ is the start model (rl_meta.json says which)"
        },
    )
    seed_data: int = 0


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


RL_CONFIGS = {"grpo": GRPOConfig, "dpo": DPOConfig}


def parse_rl_args(argv: list[str] | None = None) -> tuple[RLScriptArgs, GRPOConfig | DPOConfig, ModelConfig]:
    """Read ``algorithm`` first (YAML or CLI), then parse everything with its config class."""
    # no prefix matching in the pre-parse: `--seed` (a training argument) would be an ambiguous
    # abbreviation of `--seed_data` there and abort before the full parser sees it
    (pre, _) = TrlParser((RLScriptArgs,), allow_abbrev=False).parse_args_and_config(
        argv, return_remaining_strings=True
    )
    if pre.algorithm not in RL_CONFIGS:
        raise ValueError(f"algorithm must be one of {sorted(RL_CONFIGS)}, got {pre.algorithm!r}")
    return TrlParser((RLScriptArgs, RL_CONFIGS[pre.algorithm], ModelConfig)).parse_args_and_config(argv)


@dataclass
class ExportArgs:
    checkpoint: str = field(default="outputs/demo/sft/final", metadata={"help": "sidrec checkpoint dir"})
    output_dir: str = "outputs/export/test"
    split: str = field(default="test", metadata={"help": "valid | test | full (whole sequences)"})
    users_file: str | None = field(
        default=None, metadata={"help": "JSONL {user_id, history}; overrides split"}
    )
    dataset_dir: str | None = field(default=None, metadata={"help": "default: <checkpoint>/sidrec/meta.json"})
    max_users: int | None = field(default=None, metadata={"help": "only the first N users"})
    k: int = field(default=20, metadata={"help": "items per user"})
    max_history: int = 20
    exclude_seen: bool = field(default=False, metadata={"help": "drop the items in the user's history"})
    sid_items: list[str] | None = field(default=None, metadata={"help": "only these raw item ids"})
    sid_category: str | None = None
    sid_exclude: list[str] | None = field(default=None, metadata={"help": "never these raw item ids"})
    formats: list[str] = field(default_factory=lambda: ["jsonl", "parquet"])
    concurrency: int = field(default=8, metadata={"help": "requests in flight (the engine batches them)"})
    flush_every: int = field(default=64, metadata={"help": "fsync the partial file every N users"})
    base_url: str | None = field(
        default=None, metadata={"help": "a running sidrec server; default: start one"}
    )
    port: int = 0
    max_num_seqs: int = 256
    kv_cache_gib: int = 1
    startup_timeout: float = 900
    request_timeout: float = 300

"""RL after SFT (recipes/rl.py and the recipes package): prompts, constrained log-probs, a few GRPO and DPO steps."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recipes.constrained_logps import add_constrained_lm_head
from recipes.rewards import REWARDS, catalogue_items, completion_text
from recipes.rl_data import rl_prompt_rows
from sid_tokenizer.constrained import SidConstraint
from sid_tokenizer.sid import SidIndex, SidVocab
from tests.conftest import load_recipe, run_cmd

ROOT = Path(__file__).resolve().parents[1]
RL_CONFIGS = sorted((ROOT / "recipes" / "configs").glob("grpo_*.yaml")) + sorted(
    (ROOT / "recipes" / "configs").glob("dpo_*.yaml")
)


# ---------------------------------------------------------------- fast


@pytest.mark.parametrize("path", RL_CONFIGS, ids=lambda p: p.name)
def test_rl_recipes_parse(path):
    rl = load_recipe("rl")
    script, train, model = rl.parse_rl_args(["--config", str(path)])
    assert path.name.startswith(script.algorithm)
    assert type(train).__name__ == {"grpo": "GRPOConfig", "dpo": "DPOConfig"}[script.algorithm]
    assert model.model_name_or_path.endswith("final") and train.output_dir
    assert not train.bf16
    if script.algorithm == "grpo":
        assert set(script.reward_funcs) <= set(REWARDS)
        assert len(train.reward_weights) == len(script.reward_funcs)
        assert script.rollout in ("beam", "sample")
        assert (train.per_device_train_batch_size * train.steps_per_generation) % train.num_generations == 0
    else:
        assert script.mining_beams > script.num_negatives
    if train.load_best_model_at_end:
        assert train.metric_for_best_model == "eval_NDCG@10" and script.rank_eval_users > 0
        assert train.save_steps % train.eval_steps == 0


def test_cli_overrides_pick_the_config_class():
    rl = load_recipe("rl")
    script, train, _ = rl.parse_rl_args(["--config", "recipes/configs/dpo_demo.yaml", "--beta", "0.2"])
    assert script.algorithm == "dpo" and type(train).__name__ == "DPOConfig" and train.beta == 0.2
    script, train, _ = rl.parse_rl_args(["--config", "recipes/configs/grpo_demo.yaml", "--rollout", "sample"])
    assert type(train).__name__ == "GRPOConfig" and script.rollout == "sample"
    with pytest.raises(ValueError, match="num_generations"):  # GRPO fields are not DPO fields
        rl.parse_rl_args(["--config", "recipes/configs/grpo_demo.yaml", "--algorithm", "dpo"])
    with pytest.raises(ValueError, match="algorithm must be one of"):
        rl.parse_rl_args(["--config", "recipes/configs/grpo_demo.yaml", "--algorithm", "ppo"])


def test_rl_prompts_come_from_training_sequences_only():
    index = SidIndex(np.arange(30).reshape(10, 3) % 8, SidVocab((8, 8, 8)))
    train = [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9]]
    for prefix in ("uniform", "last"):
        rows = rl_prompt_rows(index, train, num_prompts=20, max_history=2, prefix=prefix, seed=1)
        assert len(rows) == 20
        for r in rows:
            window = r["history"] + [r["target_item"]]
            assert any(window == s[i : i + len(window)] for s in train for i in range(len(s))), r
            assert 1 <= len(r["history"]) <= 2
            assert r["prompt"] == "<|rec|>" + "".join(index.sid(i) for i in r["history"])
            if prefix == "last":
                assert any(window == s[-len(window) :] for s in train)
    chat = rl_prompt_rows(index, train, 3, prompt_format="chat")
    assert (
        chat[0]["prompt"][0]["role"] == "user"
        and index.sid(chat[0]["history"][-1]) in chat[0]["prompt"][0]["content"]
    )


class _OneProcess:
    @staticmethod
    @contextlib.contextmanager
    def main_process_first(desc=""):
        yield


def test_mined_pairs_are_cached_and_checked_against_the_run(tmp_path):
    from recipes.dpo import mined_pairs

    rows = [{"prompt": f"<|rec|><a_{i}>", "target_item": i} for i in range(4)]
    calls = []

    def mine(rows, negatives=2):
        def run():
            calls.append(len(rows))
            return [
                {
                    "prompt": r["prompt"],
                    "chosen": "c",
                    "rejected": f"r{k}",
                    "target_item": r["target_item"],
                    "rejected_rank": k + 1,
                }
                for r in rows
                for k in range(negatives)
            ]

        return run

    path = tmp_path / "pairs_train.jsonl"
    pairs = mined_pairs(path, _OneProcess, rows, mine(rows), num_negatives=2, num_beams=5)
    assert len(pairs) == 8 and calls == [4]
    assert mined_pairs(path, _OneProcess, rows, mine(rows), 2, 5) == pairs and calls == [4]  # reused
    with pytest.raises(ValueError, match="mined for another run.*prompts not in"):
        mined_pairs(path, _OneProcess, rows[:2] + [{"prompt": "x", "target_item": 9}], mine(rows), 2, 5)
    with pytest.raises(ValueError, match="num_negatives=1"):
        mined_pairs(path, _OneProcess, rows, mine(rows), 1, 5)
    with pytest.raises(ValueError, match="mining_beams=1"):
        mined_pairs(path, _OneProcess, rows, mine(rows), 2, 1)
    assert calls == [4] and [p.name for p in tmp_path.iterdir()] == ["pairs_train.jsonl"]


def test_output_dir_of_a_killed_run_is_cleaned_to_the_last_complete_checkpoint(tmp_path):
    from recipes import training as tr

    rl = load_recipe("rl")
    out = tmp_path / "rl"
    assert tr.last_complete_checkpoint(out) is None
    for step, state in (
        (2, '{"global_step": 2, "max_steps": 6, "num_train_epochs": 1}'),
        (4, '{"global_step": 4, "max_st'),
        (10, None),
    ):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
        if state:
            (out / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (out / ".final.partial").mkdir()
    (out / ".pairs_train.jsonl.x1.tmp").write_text('{"prompt": ')
    (out / "pairs_eval.jsonl").write_text("{}\n")
    assert tr.last_complete_checkpoint(out) == str(out / "checkpoint-2")  # read-only lookup
    tr.clean_output_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "pairs_eval.jsonl"]
    last = tr.last_complete_checkpoint(out)
    assert last == str(out / "checkpoint-2")
    _, grpo, _ = rl.parse_rl_args(["--config", "recipes/configs/grpo_demo.yaml", "--max_steps", "6"])
    assert tr.finished_state(last, grpo) is None
    grpo.max_steps = 2
    assert tr.finished_state(last, grpo)["global_step"] == 2
    grpo.max_steps, grpo.num_train_epochs = -1, 1
    assert tr.finished_state(last, grpo) is None  # 2 of the 6 steps of one epoch
    assert tr.finished_state(None, grpo) is None


# ---------------------------------------------------------------- slow: the tiny SFT model


def _first_rows(dataset_dir, index, n=6):
    from data_prep.dataset import RecDataset

    ds = RecDataset.load(dataset_dir)
    return rl_prompt_rows(index, ds.train, n, seed=0)


@pytest.mark.slow
def test_constrained_logprobs_match_a_masked_softmax(tiny_sft, scientific_dirs):
    """The patched head returns log softmax over the trie-allowed tokens, position by position."""
    from sid_tokenizer.catalog import load_checkpoint

    model, tok, cat = load_checkpoint(tiny_sft / "final")
    constraint = SidConstraint(cat.index, tok, model.config.vocab_size)
    rows = _first_rows(scientific_dirs["dataset"], cat.index)
    texts = [r["prompt"] + cat.index.sid(r["target_item"]) + tok.eos_token for r in rows]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    num_new = cat.index.vocab.num_levels + 1
    labels = batch["input_ids"].clone()
    labels[:, :-num_new] = -100
    with torch.no_grad():
        logits = model(**batch).logits.float()
    add_constrained_lm_head(model, constraint)
    with torch.no_grad():
        out = model(**batch, labels=labels, fused_lm_head=True)
        assert torch.allclose(model(**batch).logits, logits)  # plain forward untouched
    plen = batch["input_ids"].shape[1] - num_new
    proc = constraint.processor(plen)
    for t in range(num_new):
        pos = plen + t  # token at pos is predicted from logits at pos - 1
        allowed = proc.allowed_mask(batch["input_ids"][:, :pos], logits.shape[-1])
        ref = torch.log_softmax(logits[:, pos - 1].masked_fill(~allowed, float("-inf")), -1)
        want = ref.gather(1, batch["input_ids"][:, pos : pos + 1]).squeeze(1)
        torch.testing.assert_close(out.log_probs[:, pos - 1], want, rtol=1e-4, atol=1e-4)
    assert (out.log_probs[:, -1] == 0).all()  # EOS is the only token allowed after a full SID
    assert (out.log_probs[:, : plen - 1] == 0).all() and not out.label_mask[:, : plen - 1].any()
    full = (
        torch.log_softmax(logits[:, plen - 1 : -1], -1)
        .gather(2, batch["input_ids"][:, plen:, None])
        .squeeze(2)
    )
    assert (out.log_probs[:, plen - 1 :] >= full - 1e-5).all()  # renormalising only adds mass


def _run_grpo(
    tmp_path, tiny_sft, monkeypatch, rollout: str, steps: int, prompt_format: str = "seq2seq"
) -> tuple[Path, list]:
    """GRPO in-process with a recording reward: returns the output dir and every completion the
    rewards saw, with the columns they were given."""
    rl = load_recipe("rl")
    seen = []

    def record(completions, target_item, beam_rank=None, **kwargs):
        seen.extend(zip(completions, target_item, beam_rank or [None] * len(completions), strict=True))
        return [0.0] * len(completions)

    monkeypatch.setitem(REWARDS, "record", record)
    out = tmp_path / f"grpo_{rollout}_{prompt_format}"
    args = [
        "--prompt_format",
        prompt_format,
        "--config",
        "recipes/configs/grpo_demo.yaml",
        "--model_name_or_path",
        str(tiny_sft / "final"),
        "--output_dir",
        str(out),
        "--rollout",
        rollout,
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--num_train_prompts",
        "16",
        "--eval_prompts",
        "4",
        "--max_steps",
        str(steps),
        "--eval_steps",
        str(steps),
        "--save_steps",
        str(steps),
        "--rank_eval_users",
        "8",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ]
    rewards = {"exact": "1.0", "prefix": "0.5", "validity": "0.1", "record": "0.0"}
    if rollout == "beam":
        rewards["rank"] = "1.0"  # needs beam_rank
    args += ["--reward_funcs", *rewards, "--reward_weights", *rewards.values()]
    rl.main(*rl.parse_rl_args(args))
    return out, seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "rollout,prompt_format", [("beam", "seq2seq"), ("sample", "seq2seq"), ("beam", "chat")]
)
def test_grpo_rewards_only_see_catalogue_items(tiny_sft, tmp_path, monkeypatch, rollout, prompt_format):
    from sid_tokenizer.catalog import Catalogue

    out, seen = _run_grpo(tmp_path, tiny_sft, monkeypatch, rollout, steps=2, prompt_format=prompt_format)
    index = Catalogue.load(tiny_sft / "final").index
    # 2 train steps x 8 completions, plus the eval pass over 4 validation prompts x 4
    assert len(seen) >= 2 * 8 + 4 * 4
    for completion, _, _ in seen:
        assert len(catalogue_items(completion, index)) >= 1, completion
    if rollout == "beam":
        for g in range(0, len(seen), 4):
            group = seen[g : g + 4]
            assert [r for _, _, r in group] == [1, 2, 3, 4]
            assert len({completion_text(c) for c, _, _ in group}) == 4  # the G distinct beam items
            assert len({t for _, t, _ in group}) == 1  # one prompt per group
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "sidrec" / "index.json").exists()
    assert Catalogue.load(final).index.codes.shape == index.codes.shape
    assert (out / "training_curves.png").stat().st_size > 1000
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = state["log_history"]
    assert all(r["completions/valid_sid"] == 1.0 for r in logs if "completions/valid_sid" in r)
    assert any("rewards/prefix/mean" in r and "kl" in r for r in logs)
    # step 1 scores the rollouts before any update: policy == reference, so the KL is ~0 (attention
    # dropout, which TRL's disable_dropout misses, would make it noisy)
    assert logs[0]["kl"] < 1e-5
    assert any("eval_NDCG@10" in r for r in logs)


@pytest.mark.slow
def test_resumed_grpo_run_equals_an_uninterrupted_one(tiny_sft, tmp_path):
    """Sampled rollouts and a dense reward (collaborative): a run stopped at a checkpoint and resumed
    draws the same rollouts (data order and RNG restored) and ends with the same weights."""
    from safetensors.torch import load_file

    rl = load_recipe("rl")

    def run(out, steps):
        args = [
            "--config", "recipes/configs/grpo_demo.yaml", "--model_name_or_path", str(tiny_sft / "final"),
            "--output_dir", str(out), "--rollout", "sample", "--reward_funcs", "collaborative", "prefix",
            "--reward_weights", "1.0", "0.5", "--collaborative_sasrec_epochs", "1", "--learning_rate", "1e-3",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
            "--num_train_prompts", "32", "--eval_prompts", "4", "--rank_eval_users", "8",
            "--rank_eval_beams", "10", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1",
            "--load_best_model_at_end", "false", "--report_to", "none", "--max_steps", str(steps),
        ]  # fmt: skip
        rl.main(*rl.parse_rl_args(args))
        state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
        return [(r["step"], r["loss"], r["reward"], r["kl"]) for r in state["log_history"] if "loss" in r]

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 4)
    resumed = run(tmp_path / "resumed", 6)  # the same recipe with more steps: resumes from checkpoint-4
    assert resumed == straight and any(kl > 0 for *_, kl in straight)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_dpo_mines_pairs_trains_resumes_and_saves(tiny_sft, tmp_path):
    from sid_tokenizer.catalog import Catalogue

    out = tmp_path / "dpo"
    base = [
        sys.executable,
        "recipes/rl.py",
        "--config",
        "recipes/configs/dpo_demo.yaml",
        "--model_name_or_path",
        str(tiny_sft / "final"),
        "--output_dir",
        str(out),
        "--num_train_prompts",
        "24",
        "--eval_prompts",
        "8",
        "--num_negatives",
        "2",
        "--mining_beams",
        "5",
        "--per_device_train_batch_size",
        "8",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--rank_eval_users",
        "8",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ]
    run_cmd(base + ["--max_steps", "2"])
    index = Catalogue.load(tiny_sft / "final").index
    pairs = [json.loads(line) for line in (out / "pairs_train.jsonl").read_text().splitlines()]
    assert len(pairs) == 24 * 2  # num_negatives rows per prompt
    for p in pairs:
        assert p["chosen"] == index.sid(p["target_item"])
        assert p["target_item"] not in catalogue_items(p["rejected"], index)
        assert catalogue_items(p["rejected"], index) and 1 <= p["rejected_rank"] <= 5
    mtime = (out / "pairs_train.jsonl").stat().st_mtime
    proc = run_cmd(base + ["--max_steps", "3"])  # resumes from checkpoint-2, reuses the mined pairs
    assert "resuming from" in proc.stderr and (out / "pairs_train.jsonl").stat().st_mtime == mtime
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert any("rewards/margins" in r for r in state["log_history"])
    assert any("eval_NDCG@10" in r for r in state["log_history"])
    final = out / "final"
    assert (final / "model.safetensors").exists() and (final / "sidrec" / "items.jsonl").exists()


def test_rl_report_merges_eval_outputs(tmp_path):
    from data_prep.io import atomic_write_json
    from eval.rl_report import RLReportArgs, write_rl_report

    def row(model, split, ndcg):
        cell = {"value": ndcg, "ci_low": ndcg - 0.01, "ci_high": ndcg + 0.01}
        return {"model": model, "split": split, "metrics": {"NDCG@10": cell, "HR@10": cell}, "extra": {}}

    inputs = []
    for model, ndcg in (("SFT", 0.03), ("SFT+GRPO", 0.035)):
        path = tmp_path / model / "metrics.json"
        atomic_write_json(
            path, {"meta": {}, "results": {f"{model}/{s}": row(model, s, ndcg) for s in ("valid", "test")}}
        )
        inputs.append(str(path))
    paths = write_rl_report(
        RLReportArgs(inputs=inputs, output=str(tmp_path / "rl"), metrics=["HR@10", "NDCG@10"])
    )
    md = (tmp_path / "rl.md").read_text()
    assert "| SFT+GRPO | 0.0350 [0.0250, 0.0450]" in md and "## valid" in md and "## test" in md
    assert len(json.loads(paths[0].read_text())["results"]) == 4
    with pytest.raises(ValueError, match="already read"):
        write_rl_report(RLReportArgs(inputs=inputs + inputs[:1], output=str(tmp_path / "rl2")))


@pytest.mark.slow
def test_paired_differences_of_a_checkpoint_to_itself_are_zero(tiny_sft, tmp_path):
    from eval.rl_report import RLReportArgs, paired_differences, paired_markdown

    ckpt = str(tiny_sft / "final")
    args = RLReportArgs(inputs=[], paired=[f"A={ckpt}", f"B={ckpt}"], paired_max_users=8, num_beams=5)
    rows = paired_differences(args)
    assert [(r["model"], r["split"], r["metric"]) for r in rows] == [
        ("B", s, m) for s in ("valid", "test") for m in ("NDCG@10", "HR@10", "HR@5", "HR@20")
    ]
    assert all(r["difference"] == 0 and r["users"] == 8 and r["better_users"] == 0 for r in rows)
    assert paired_markdown(rows)[2].startswith("| B - A | valid | NDCG@10 | 8 | +0.0000")
    with pytest.raises(ValueError, match="NAME=CHECKPOINT"):
        paired_differences(RLReportArgs(inputs=[], paired=[ckpt]))


@pytest.mark.slow
def test_sasrec_scorer_feeds_the_collaborative_reward(scientific_dirs):
    from data_prep.dataset import RecDataset
    from recipes.rewards import RewardContext, bind_rewards, sasrec_item_scorer
    from sid_tokenizer.catalog import load_sid_dir

    ds = RecDataset.load(scientific_dirs["dataset"])
    index = load_sid_dir(scientific_dirs["sid"], ds)
    scorer = sasrec_item_scorer(ds, epochs=1, patience=1, hidden_size=16)
    histories = [ds.valid[0].history, ds.valid[1].history]
    scores = scorer(histories)
    assert scores.shape == (2, ds.num_items) and np.isfinite(scores).all()
    (reward,) = bind_rewards(["collaborative"], RewardContext(index, item_scorer=scorer))
    best = int(scores[0].argmax())
    r = reward(completions=[index.sid(best), "nonsense"], history=[histories[0]] * 2)
    assert r[0] == pytest.approx(1.0, abs=1e-3) and r[1] == 0.0


def test_start_model_wins_when_no_checkpoint_beats_it(tmp_path):
    """The selection rule of recipes.training.start_is_better on real Trainer args/state."""
    from transformers import TrainerState, TrainingArguments

    from recipes.training import start_is_better

    def trainer(best, greater=True, metric="NDCG@10", load_best=True):
        args = TrainingArguments(
            output_dir=str(tmp_path), eval_strategy="steps", save_strategy="steps", report_to="none",
            metric_for_best_model=metric, greater_is_better=greater, load_best_model_at_end=load_best,
        )  # fmt: skip
        return SimpleNamespace(args=args, state=TrainerState(best_metric=best))

    start = {"eval_NDCG@10": 0.020, "eval_loss": 1.5}
    assert start_is_better(trainer(0.019), start)  # RL got worse: keep the start model
    assert start_is_better(trainer(0.020), start)  # a tie: training bought nothing
    assert not start_is_better(trainer(0.021), start)
    assert start_is_better(trainer(None), start)  # no checkpoint was ever scored
    assert not start_is_better(trainer(1.4, greater=False, metric="loss"), start)
    assert start_is_better(trainer(1.6, greater=False, metric="eval_loss"), start)
    assert not start_is_better(trainer(0.019, load_best=False), start)  # the caller asked for the last
    assert not start_is_better(trainer(0.019), None)  # keep_start_if_better off


@pytest.mark.slow
def test_rl_final_is_the_better_of_start_and_best_checkpoint(tiny_sft, tmp_path):
    """The start model and every DPO checkpoint are scored on the same rank-eval users; final/ is
    bit for bit the start model when no checkpoint beat it (ties included), else the best checkpoint,
    and rl_meta.json records both scores and the choice. (A destructive learning rate; the 6-step
    fixture model is weak enough that either branch can happen, so the test checks the one taken.)"""
    from safetensors.torch import load_file

    out = tmp_path / "dpo"
    cmd = [
        sys.executable, "recipes/rl.py", "--config", "recipes/configs/dpo_demo.yaml",
        "--model_name_or_path", str(tiny_sft / "final"), "--output_dir", str(out),
        "--num_train_prompts", "24", "--eval_prompts", "8", "--num_negatives", "2", "--mining_beams", "5",
        "--per_device_train_batch_size", "8", "--learning_rate", "0.5", "--max_steps", "4",
        "--eval_steps", "2", "--save_steps", "2", "--save_total_limit", "3", "--rank_eval_users", "300",
        "--report_to", "none",
    ]  # fmt: skip
    run_cmd(cmd)
    meta = json.loads((out / "rl_meta.json").read_text())["selection"]
    start = json.loads((out / "start_metrics.json").read_text())
    assert meta["start"] == start and meta["metric"] == "eval_NDCG@10"
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    scores = [r["eval_NDCG@10"] for r in state["log_history"] if "eval_NDCG@10" in r]
    assert len(scores) == 2 and meta["best_metric"] == max(scores)
    keep_start = meta["best_metric"] <= start["eval_NDCG@10"]
    assert meta["final"] == ("start" if keep_start else "trained")
    source = tiny_sft / "final" if keep_start else Path(meta["best_checkpoint"])
    if not source.is_absolute():
        source = ROOT / source
    a = load_file(source / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "final" / "sidrec" / "items.jsonl").exists()

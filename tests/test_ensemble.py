"""Checkpoint ensembles (eval/ensemble.py): one constrained beam search over averaged distributions."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_prep.dataset import RecDataset
from eval.ensemble import EnsembleLM, check_members
from eval.evaluate import EvalArgs, evaluate_checkpoint
from eval.generate import SidRanker
from sid_tokenizer.catalog import load_checkpoint
from sid_tokenizer.prompts import seq2seq_prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def members(tiny_sft, scientific_dirs):
    """Two different models of one family: the fixture run's step-3 checkpoint and its final model."""
    ckpts = [
        sorted(tiny_sft.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[0],
        tiny_sft / "final",
    ]
    loaded = [load_checkpoint(c) for c in ckpts]
    ds = RecDataset.load(scientific_dirs["dataset"])
    prompts = [seq2seq_prompt(loaded[0][2].index, e.history) for e in ds.test[:5]]
    return SimpleNamespace(
        paths=ckpts, models=[m for m, _, _ in loaded], tok=loaded[0][1], cat=loaded[0][2], prompts=prompts
    )


def test_members_really_differ(members):
    a, b = members.models
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("mode", ["prob", "logprob"])
def test_ensemble_of_one_model_twice_ranks_like_the_model(members, mode):
    model = members.models[1]
    single = SidRanker(model, members.tok, members.cat.index).rank(
        members.prompts, num_beams=10, batch_size=5, progress=False
    )
    ens = SidRanker(EnsembleLM([model, model], mode=mode), members.tok, members.cat.index)
    twice = ens.rank(members.prompts, num_beams=10, batch_size=5, progress=False)
    assert twice.sids == single.sids
    np.testing.assert_allclose(np.array(twice.scores), np.array(single.scores), rtol=1e-5, atol=1e-5)


def _full_forward_logp(models, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """Ensemble next-token log-probabilities at every position, without any KV cache."""
    with torch.no_grad():
        logps = torch.stack([torch.log_softmax(m(input_ids=ids).logits.float(), -1) for m in models])
    if mode == "prob":
        return torch.logsumexp(logps, 0) - math.log(len(models))
    return torch.log_softmax(logps.mean(0), -1)


@pytest.mark.parametrize("mode", ["prob", "logprob"])
def test_ensemble_beam_scores_are_the_ensemble_sequence_log_probs(members, mode):
    """Beam search with the members' caches repeated and reordered scores each beam with exactly
    the sum of the ensemble's log-probabilities recomputed from scratch, and the two members
    disagree (the ensemble is not just one of them)."""
    ens = EnsembleLM(members.models, mode=mode)
    ranker = SidRanker(ens, members.tok, members.cat.index)
    levels = members.cat.index.vocab.num_levels
    differs = 0
    for prompt in members.prompts[:3]:  # one prompt per batch: no padding in the recomputation
        ranking = ranker.rank([prompt], num_beams=6, batch_size=1, progress=False)
        alone = [
            SidRanker(m, members.tok, members.cat.index).rank(
                [prompt], num_beams=6, batch_size=1, progress=False
            )
            for m in members.models
        ]
        differs += alone[0].sids != alone[1].sids
        pids = members.tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        for sid, score in zip(ranking.sids[0], ranking.scores[0], strict=True):
            assert sid is not None
            sid_ids = members.tok(
                members.cat.index.vocab.format(sid), return_tensors="pt", add_special_tokens=False
            )["input_ids"]
            assert sid_ids.shape[1] == levels
            ids = torch.cat([pids, sid_ids], dim=1)
            logp = _full_forward_logp(members.models, ids, mode)
            plen = pids.shape[1]
            expected = sum(logp[0, plen - 1 + j, sid_ids[0, j]].item() for j in range(levels))
            assert score == pytest.approx(expected, abs=1e-3)
    assert differs > 0


def test_check_members_rejects_another_sid_index(members):
    tok = members.tok
    other = dict(members.cat.index.sid_to_items)
    first = next(iter(other))
    other[first] = [*other[first], 10**6]
    with pytest.raises(ValueError, match="SID index differs"):
        check_members(
            ["a", "b"], [tok, tok], [members.cat, SimpleNamespace(index=SimpleNamespace(sid_to_items=other))]
        )
    check_members(["a", "b"], [tok, tok], [members.cat, members.cat])


def test_ensemble_needs_two_models_and_a_known_mode(members):
    with pytest.raises(ValueError, match="at least 2"):
        EnsembleLM(members.models[:1])
    with pytest.raises(ValueError, match="mode"):
        EnsembleLM(members.models, mode="vote")


def test_evaluate_cli_ranks_an_ensemble(members, tmp_path):
    args = EvalArgs(
        checkpoint=str(members.paths[1]),
        ensemble=[str(members.paths[0])],
        model_name="ens",
        ensemble_mode="prob",
        splits=["valid"],
        max_users=24,
        n_boot=50,
        also_unconstrained=False,
        output_dir=str(tmp_path),
    )
    res = evaluate_checkpoint(args)["ens/valid"]
    assert res["extra"]["ensemble"] == [str(members.paths[1]), str(members.paths[0])]
    assert res["extra"]["constrained_validity"] == 1.0
    assert res["extra"]["users"] == 24
    assert 0.0 <= res["metrics"]["HR@10"]["value"] <= 1.0
    with pytest.raises(ValueError, match="sid_beam"):
        evaluate_checkpoint(EvalArgs(**{**args.__dict__, "backend": "hf"}))

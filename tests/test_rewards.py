"""Rule-based RL rewards on hand-made catalogues (recipes.rewards)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from recipes.rewards import REWARDS, RewardContext, bind_rewards, catalogue_items, parse_sid, rank_penalties
from sid_tokenizer.sid import SidIndex, SidVocab

# items 0..4; items 3 and 4 share the SID (1, 1, 0) (a collision)
CODES = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 1, 0), (1, 1, 0)]


@pytest.fixture
def ctx() -> RewardContext:
    return RewardContext(SidIndex(np.array(CODES), SidVocab((4, 4, 4))))


def sid(codes) -> str:
    return "".join(f"<{p}_{c}>" for p, c in zip("abc", codes, strict=True))


def call(name, ctx, completions, **kw):
    (f,) = bind_rewards([name], ctx)
    return f(
        prompts=["p"] * len(completions),
        completions=completions,
        completion_ids=[[]] * len(completions),
        **kw,
    )


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<a_0><b_0><c_1>", (0, 0, 1)),
        ("  <a_0><b_0><c_1>\n", (0, 0, 1)),
        ("<a_0> <b_0> <c_1>", (0, 0, 1)),  # some tokenizers decode added tokens with spaces
        ("<a_0><b_0>", None),  # too short
        ("<a_0><b_0><c_1><a_1>", None),  # too long
        ("<b_0><a_0><c_1>", None),  # levels out of order
        ("<a_0><b_0><c_9>", None),  # code beyond the codebook
        ("item <a_0><b_0><c_1>", None),  # text around the SID
        ("<a_0><b_0><c_1>.", None),
        ("", None),
    ],
)
def test_parse_sid(ctx, text, expected):
    assert parse_sid(text, ctx.index) == expected


def test_catalogue_items_and_chat_completions(ctx):
    assert catalogue_items(sid((1, 1, 0)), ctx.index) == [3, 4]
    assert catalogue_items(sid((3, 3, 3)), ctx.index) == []  # well-formed, not in the catalogue
    assert catalogue_items([{"role": "assistant", "content": sid((0, 1, 0))}], ctx.index) == [2]


# ---------------------------------------------------------------- exact / prefix / validity


def test_exact_is_item_level(ctx):
    completions = [sid((0, 0, 1)), sid((0, 0, 0)), sid((1, 1, 0)), "garbage", sid((3, 3, 3))]
    assert call("exact", ctx, completions, target_item=[1, 1, 4, 1, 1]) == [1.0, 0.0, 0.5, 0.0, 0.0]


def test_prefix_gives_partial_credit_from_the_first_level(ctx):
    completions = [
        sid((0, 0, 1)),
        sid((0, 0, 0)),
        sid((0, 1, 0)),
        sid((1, 0, 1)),
        "<a_0><b_0>",
        sid((3, 3, 3)),
    ]
    # target item 1 = (0, 0, 1); (1, 0, 1) matches levels b and c but not a: no credit
    assert call("prefix", ctx, completions, target_item=[1] * 6) == pytest.approx([1, 2 / 3, 1 / 3, 0, 0, 0])


def test_validity_needs_a_catalogue_sid(ctx):
    completions = [sid((0, 0, 0)), sid((3, 3, 3)), "<a_0><b_0>", "hello", sid((1, 1, 0))]
    assert call("validity", ctx, completions) == [1.0, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------- rank


def test_rank_penalties_sum_to_minus_one_and_decrease_with_rank():
    p = rank_penalties(4)
    assert sum(p) == pytest.approx(-1.0)
    assert p[0] < p[1] < p[2] < p[3] < 0
    assert p[0] / p[1] == pytest.approx(math.log2(3) / math.log2(2))


def test_rank_penalises_wrong_items_above_in_groups_with_a_hit(ctx):
    # two beam groups of 3: the first contains the target (item 2) at rank 2, the second does not
    completions = [
        sid((0, 0, 0)),
        sid((0, 1, 0)),
        sid((0, 0, 1)),
        sid((0, 0, 0)),
        sid((0, 0, 1)),
        sid((1, 1, 0)),
    ]
    p = rank_penalties(3)
    r = call("rank", ctx, completions, target_item=[2] * 3 + [2] * 3, beam_rank=[1, 2, 3, 1, 2, 3])
    assert r == pytest.approx([p[0], 0.0, p[2], 0.0, 0.0, 0.0])
    # the wrong item at rank 1 costs more than the one at rank 3
    assert r[0] < r[2] < 0


def test_rank_counts_a_collision_group_containing_the_target_as_a_hit(ctx):
    completions = [sid((1, 1, 0)), sid((0, 0, 0))]
    assert call("rank", ctx, completions, target_item=[4, 4], beam_rank=[1, 2]) == pytest.approx(
        [0.0, rank_penalties(2)[1]]
    )


def test_rank_needs_beam_ranks(ctx):
    with pytest.raises(ValueError, match="rollout: beam"):
        call("rank", ctx, [sid((0, 0, 0))], target_item=[0])
    with pytest.raises(ValueError, match="start each group"):
        call("rank", ctx, [sid((0, 0, 0))], target_item=[0], beam_rank=[2])


# ---------------------------------------------------------------- collaborative


def test_collaborative_is_the_score_percentile_of_the_item(ctx):
    seen = []

    def scorer(histories):
        seen.extend(histories)
        return np.array([[5.0, 4.0, 3.0, 2.0, 1.0]] * len(histories))

    ctx.item_scorer = scorer
    completions = [sid((0, 0, 0)), sid((0, 1, 0)), sid((1, 1, 0)), "garbage"]
    r = call("collaborative", ctx, completions, history=[[1, 2]] * 4)
    # item 0 is the scorer's best (1.0); item 2 beats 2 of 4 others; SID (1,1,0) counts its best item 3
    assert r == pytest.approx([1.0, 0.5, 0.25, 0.0])
    assert seen == [[1, 2]]  # one scorer call per distinct history


def test_collaborative_without_a_scorer_fails_loudly(ctx):
    with pytest.raises(ValueError, match="item_scorer"):
        call("collaborative", ctx, [sid((0, 0, 0))], history=[[1]])


# ---------------------------------------------------------------- registry


def test_registry_names_and_binding(ctx):
    assert set(REWARDS) == {"exact", "prefix", "rank", "validity", "collaborative"}
    funcs = bind_rewards(["exact", "validity"], ctx)
    assert [f.__name__ for f in funcs] == ["exact", "validity"]  # TRL logs rewards/<name>/mean
    assert pickle.loads(pickle.dumps(funcs[0]))(completions=[sid((0, 0, 0))], target_item=[0]) == [1.0]
    with pytest.raises(ValueError, match="unknown reward 'ndcg'"):
        bind_rewards(["ndcg"], ctx)


def test_rewards_accept_trl_keyword_arguments(ctx):
    # TRL passes trainer_state, log_metric, log_extra and every dataset column
    extra = {
        "trainer_state": None,
        "log_metric": print,
        "log_extra": print,
        "history": [[0]],
        "target_item": [0],
    }
    for name in ("exact", "prefix", "validity"):
        assert call(name, ctx, [sid((0, 0, 0))], **extra) == [1.0]

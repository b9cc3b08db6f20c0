"""Non-LLM baselines on the same leave-one-out split, metric code and full-catalogue ranking.

Every baseline has ``fit(dataset, split)`` and ``rank(histories, k) -> top-k item ids``.
``split`` names the split about to be evaluated and fixes what the model may learn from:

- ``"valid"``: the training sequences only (``dataset.train``: each user's items before the
  validation target);
- ``"test"``: everything before the test target, i.e. the training sequences plus the
  validation targets (``example.history`` of the test split).

Rankings cover the whole catalogue. Nothing is excluded except the padding item: items already
in the history are *not* filtered, because the generative models of this project may also
recommend repeats and every model must rank the same candidate set.

SASRec protocol (Kang & McAuley 2018, as in the original code and RecBole): weights are trained
on the training sequences with early stopping on validation NDCG@10; at test time the same
weights read the history up to and including the validation item (``test.history``), so the
validation target is model-selection data and input context, not a training target. Set
``test_protocol="retrain"`` to instead retrain from scratch on the test histories for the
number of epochs that was best on validation.

Tied vs untied output (measured on Scientific, docs/results/baselines_scientific.md): with the
paper's tied item embeddings the hidden state keeps a residual copy of the last input item, so
unfiltered SASRec ranks a history item first for ~95% of users although no valid/test target is
a repeat (HR@1 0.026; 0.051 once history items are filtered). ``sasrec_untied`` scores against a
separate output table: the bias disappears (history item first for ~2%) and validation NDCG@10
rises (0.070 -> 0.079), but HR@10/20 fall (it overfits sooner). Both are reported.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data_prep.dataset import RecDataset
from eval.metrics import rank_metrics, singleton_groups

logger = logging.getLogger(__name__)

SPLITS = ("valid", "test")


def training_sequences(dataset: RecDataset, split: str) -> list[list[int]]:
    """Each user's items strictly before the target of ``split`` (the data a model may fit on)."""
    if split == "valid":
        return [list(s) for s in dataset.train]
    if split == "test":
        return [list(e.history) for e in dataset.test]
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def examples(dataset: RecDataset, split: str):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return getattr(dataset, split)


class Recommender(Protocol):
    def fit(self, dataset: RecDataset, split: str) -> None: ...

    def rank(self, histories: list[list[int]], k: int) -> list[list[int]]: ...

    def info(self) -> dict[str, Any]: ...


class RandomRecommender:
    """Uniformly random top-k over the catalogue: the floor (expected HR@k = k / num_items)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.num_items = 0

    def fit(self, dataset: RecDataset, split: str) -> None:
        training_sequences(dataset, split)  # validates split
        self.num_items = dataset.num_items

    def rank(self, histories: list[list[int]], k: int) -> list[list[int]]:
        rng = np.random.default_rng(self.seed)
        k = min(k, self.num_items)
        return [rng.choice(self.num_items, size=k, replace=False).tolist() for _ in histories]

    def info(self) -> dict[str, Any]:
        return {}


class Popularity:
    """Items ranked by interaction count in the split's training data (ties: lower item id first)."""

    def __init__(self, seed: int = 0) -> None:
        self.order: np.ndarray = np.zeros(0, dtype=np.int64)
        self.counts: np.ndarray = np.zeros(0, dtype=np.int64)

    def fit(self, dataset: RecDataset, split: str) -> None:
        seqs = training_sequences(dataset, split)
        flat = np.fromiter((i for s in seqs for i in s), dtype=np.int64)
        self.counts = np.bincount(flat, minlength=dataset.num_items)
        self.order = np.argsort(-self.counts, kind="stable")

    def rank(self, histories: list[list[int]], k: int) -> list[list[int]]:
        top = self.order[:k].tolist()
        return [list(top) for _ in histories]

    def info(self) -> dict[str, Any]:
        return {"interactions_counted": int(self.counts.sum())}


# --------------------------------------------------------------------------------------- SASRec


@dataclass
class SASRecConfig:
    """SASRec hyper-parameters (defaults: the original paper's Beauty setting, CE loss)."""

    hidden_size: int = field(default=64, metadata={"help": "embedding / hidden size"})
    num_blocks: int = field(default=2, metadata={"help": "causal self-attention blocks"})
    num_heads: int = field(default=1, metadata={"help": "attention heads"})
    dropout: float = field(default=0.5, metadata={"help": "dropout (embeddings, attention, FFN)"})
    max_len: int = field(default=50, metadata={"help": "most recent items fed to the model"})
    loss: str = field(
        default="ce",
        metadata={
            "help": "ce: softmax over the full catalogue; bce: one uniform negative per position (original)"
        },
    )
    lr: float = field(
        default=3e-3,
        metadata={
            "help": "Adam learning rate; 3e-3 reaches the 1e-3 plateau "
            "(Scientific valid NDCG@10 ~0.067) in about half the epochs"
        },
    )
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: int = field(default=200, metadata={"help": "maximum training epochs"})
    patience: int = field(
        default=5, metadata={"help": "stop after this many epochs without a better validation NDCG@10"}
    )
    tied_output: bool = field(
        default=True,
        metadata={
            "help": "score items against the input embedding table (SASRec); False: a separate output table"
        },
    )
    eval_batch_size: int = 1024
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bfloat16 autocast for training steps (faster on "
            "CPUs with AVX512-BF16; scores stay fp32 at evaluation)"
        },
    )
    test_protocol: str = field(
        default="input",
        metadata={
            "help": "input: test with the validation-selected weights, history incl. the valid item "
            "(standard); retrain: retrain on train + valid targets for the best epoch count"
        },
    )


class SASRecModel(nn.Module):
    """Item embedding + learned positions -> causal pre-LN transformer -> next-item scores.

    Inputs are right-padded with 0 (item ids are shifted by one; 0 is padding). With a causal
    mask, real positions never attend to the padding at the end. Output scores use the item
    embedding table (tied weights, as in SASRec) or, with ``tied_output=False``, a separate table.
    """

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        if h % cfg.num_heads:
            raise ValueError(f"hidden_size {h} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.item_emb = nn.Embedding(num_items + 1, h, padding_idx=0)
        # untied: a separate output table, so the residual copy of the last input item in the
        # hidden state does not make that item score high (see SASRecConfig.tied_output)
        self.out_emb = None if cfg.tied_output else nn.Embedding(num_items + 1, h)
        self.pos_emb = nn.Embedding(cfg.max_len, h)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(h, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_blocks))
        self.norm = nn.LayerNorm(h)
        nn.init.normal_(self.item_emb.weight, std=h**-0.5)
        if self.out_emb is not None:
            nn.init.normal_(self.out_emb.weight, std=h**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) shifted item ids, 0 = padding -> hidden states (B, L, H)."""
        positions = torch.arange(seq.shape[1], device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        x = self.emb_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def output_weight(self) -> torch.Tensor:
        """(num_items + 1, H) item vectors that hidden states are scored against."""
        return self.item_emb.weight if self.out_emb is None else self.out_emb.weight

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> scores (N, num_items + 1); column 0 (padding) is -inf."""
        logits = hidden @ self.output_weight().T
        logits[:, 0] = float("-inf")
        return logits


class _Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.num_heads, h // self.num_heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, n, h)))
        return x + self.drop(self.ffn(self.ln2(x)))


def _pad_right(seqs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``length`` items of each sequence, shifted by +1, right-padded with 0 -> (B, L), lengths (B,)."""
    lens = [min(len(s), length) for s in seqs]
    width = max(max(lens, default=1), 1)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, (s, n) in enumerate(zip(seqs, lens, strict=True)):
        if n:
            out[r, :n] = torch.as_tensor(s[-n:], dtype=torch.long) + 1
    return out, torch.as_tensor(lens, dtype=torch.long)


class SASRec:
    """Self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), CPU-sized."""

    def __init__(self, config: SASRecConfig | None = None, seed: int = 0) -> None:
        self.cfg = config or SASRecConfig()
        if self.cfg.loss not in ("ce", "bce"):
            raise ValueError(f"SASRecConfig.loss must be 'ce' or 'bce', got {self.cfg.loss!r}")
        if self.cfg.test_protocol not in ("input", "retrain"):
            raise ValueError(
                f"SASRecConfig.test_protocol must be 'input' or 'retrain', got {self.cfg.test_protocol!r}"
            )
        self.seed = seed
        self.model: SASRecModel | None = None
        self.num_items = 0
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.best_valid_ndcg10 = 0.0
        self.fit_seconds = 0.0
        self.fitted_split: str | None = None

    # -- training
    def fit(self, dataset: RecDataset, split: str) -> None:
        if split == "valid":
            self._fit_with_early_stopping(dataset)
        elif split == "test":
            if self.fitted_split is None:
                self._fit_with_early_stopping(dataset)
            if self.cfg.test_protocol == "retrain":
                self._train(
                    dataset, training_sequences(dataset, "test"), epochs=max(self.best_epoch, 1), valid=None
                )
                self.fitted_split = "test"
            else:
                logger.info(
                    "SASRec test protocol 'input': validation-selected weights, test histories "
                    "include the validation item"
                )
        else:
            training_sequences(dataset, split)  # raises

    def _fit_with_early_stopping(self, dataset: RecDataset) -> None:
        self._train(
            dataset, training_sequences(dataset, "valid"), epochs=self.cfg.epochs, valid=dataset.valid
        )
        self.fitted_split = "valid"

    def _train(self, dataset: RecDataset, seqs: list[list[int]], epochs: int, valid: list | None) -> None:
        cfg = self.cfg
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.num_items = dataset.num_items
        self.model = SASRecModel(self.num_items, cfg)
        opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the last max_len + 1 items give max_len (input, next item) pairs per user
        seqs = [s[-(cfg.max_len + 1) :] for s in seqs if len(s) >= 2]
        data, lens = _pad_right(seqs, cfg.max_len + 1)
        best_state, best, bad, self.history = None, -1.0, 0, []
        start = time.perf_counter()
        bar = tqdm(range(1, epochs + 1), desc=f"sasrec ({len(seqs)} seqs)", leave=False)
        for epoch in bar:
            self.model.train()
            perm = torch.as_tensor(rng.permutation(len(seqs)))
            total, count = 0.0, 0
            for b in range(0, len(seqs), cfg.batch_size):
                idx = perm[b : b + cfg.batch_size]
                width = int(lens[idx].max())
                batch = data[idx, :width]
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, n = self._loss(batch[:, :-1], batch[:, 1:], rng)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * n
                count += n
            record = {"epoch": epoch, "loss": total / max(count, 1)}
            if valid is not None:
                record["valid_ndcg10"] = self._valid_ndcg10(valid)
                if record["valid_ndcg10"] > best:
                    best, bad, self.best_epoch = record["valid_ndcg10"], 0, epoch
                    best_state = copy.deepcopy(self.model.state_dict())
                else:
                    bad += 1
            self.history.append(record)
            bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
            logger.debug("sasrec epoch %d: %s", epoch, record)
            if valid is not None and bad >= cfg.patience:
                logger.info(
                    "sasrec: early stop at epoch %d (best %d, valid NDCG@10 %.4f)",
                    epoch,
                    self.best_epoch,
                    best,
                )
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
            self.best_valid_ndcg10 = best
        self.fit_seconds += time.perf_counter() - start
        logger.info(
            "sasrec: trained %d epochs in %.0fs, best epoch %d (valid NDCG@10 %.4f)",
            len(self.history),
            time.perf_counter() - start,
            self.best_epoch,
            self.best_valid_ndcg10,
        )

    def _loss(
        self, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, int]:
        assert self.model is not None
        hidden = self.model(inputs)
        mask = targets > 0
        h, pos = hidden[mask], targets[mask]
        if self.cfg.loss == "ce":
            return F.cross_entropy(self.model.scores(h).float(), pos), int(pos.numel())
        neg = torch.as_tensor(rng.integers(1, self.num_items + 1, size=pos.numel()), dtype=torch.long)
        w = self.model.output_weight()
        pos_logit = (h * w[pos]).sum(-1)
        neg_logit = (h * w[neg]).sum(-1)
        loss = F.softplus(-pos_logit).mean() + F.softplus(neg_logit).mean()
        return loss, int(pos.numel())

    def _valid_ndcg10(self, valid: list) -> float:
        ranked = self.rank([e.history for e in valid], 10)
        return rank_metrics(singleton_groups(ranked), [e.target for e in valid], ks=(10,))["NDCG@10"]

    # -- inference
    @torch.no_grad()
    def rank(self, histories: list[list[int]], k: int) -> list[list[int]]:
        """Top-k item ids over the full catalogue for each history (history items are not filtered)."""
        if self.model is None:
            raise RuntimeError("SASRec.rank called before fit")
        self.model.eval()
        out: list[list[int]] = []
        k = min(k, self.num_items)
        for b in range(0, len(histories), self.cfg.eval_batch_size):
            seq, lens = _pad_right(histories[b : b + self.cfg.eval_batch_size], self.cfg.max_len)
            hidden = self.model(seq)
            last = hidden[torch.arange(len(seq)), (lens - 1).clamp(min=0)]
            top = self.model.scores(last).topk(k, dim=1).indices - 1
            out.extend(top.tolist())
        return out

    def info(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.history),
            "best_valid_ndcg10": self.best_valid_ndcg10,
            "fit_seconds": round(self.fit_seconds, 1),
            "config": asdict(self.cfg),
        }


BASELINES: dict[str, Callable[[SASRecConfig, int], Recommender]] = {
    "random": lambda cfg, seed: RandomRecommender(seed),
    "popularity": lambda cfg, seed: Popularity(seed),
    "sasrec": lambda cfg, seed: SASRec(cfg, seed),
    # same, with a separate output table: no "repeat the last item" bias (see SASRecConfig.tied_output)
    "sasrec_untied": lambda cfg, seed: SASRec(replace(cfg, tied_output=False), seed),
}


def build_baseline(name: str, sasrec: SASRecConfig | None = None, seed: int = 0) -> Recommender:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    return BASELINES[name](sasrec or SASRecConfig(), seed)


def evaluate_recommender(
    model: Recommender,
    dataset: RecDataset,
    split: str,
    ks: tuple[int, ...] | list[int],
    exclude_history: bool = False,
) -> dict[str, Any]:
    """Rank the full catalogue for every example of ``split`` and score it with `rank_metrics`.

    ``exclude_history=False`` is this project's protocol (every model may recommend repeats).
    ``exclude_history=True`` drops the example's history items from the ranking, as RecBole-style
    full-sort evaluations do; it is a reference for published numbers, not the headline.

    Adds two diagnostics of the unfiltered ranking: ``history_share`` (mean share of each
    top-``max(ks)`` list that repeats a history item) and ``history_top1`` (share of examples whose
    first item is a history item). In the Amazon 5-core data no valid/test target is a repeat.
    """
    exs = examples(dataset, split)
    histories = [e.history for e in exs]
    kmax = max(ks)
    if exclude_history:
        longest = max((len(set(h)) for h in histories), default=0)
        ranked = [
            [i for i in r if i not in hist][:kmax]
            for r, hist in zip(model.rank(histories, kmax + longest), map(set, histories), strict=True)
        ]
    else:
        ranked = model.rank(histories, kmax)
    res = rank_metrics(singleton_groups(ranked), [e.target for e in exs], ks=ks)
    in_history = [[i in hist for i in r] for r, hist in zip(ranked, map(set, histories), strict=True)]
    res["history_share"] = float(np.mean([np.mean(f) if f else 0.0 for f in in_history])) if exs else math.nan
    res["history_top1"] = float(np.mean([bool(f and f[0]) for f in in_history])) if exs else math.nan
    return res

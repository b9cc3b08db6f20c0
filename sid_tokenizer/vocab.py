"""SID tokens inside an LLM vocabulary: add them as normal tokens and look their ids up."""

from __future__ import annotations

import numpy as np
import torch

from sid_tokenizer.sid import SidVocab


def add_sid_tokens(model, tokenizer, vocab: SidVocab, init: str = "mean", seed: int = 0) -> list[int]:
    """Add every SID token (as a normal added token, not special: decoding with
    ``skip_special_tokens=True`` keeps them) and resize the embeddings.

    init: ``mean`` (mean of existing rows + small noise, so new rows start in-distribution),
    ``random`` (the model's own initialiser). Returns the new token ids in vocabulary order.
    """
    from tokenizers import AddedToken

    if init not in ("mean", "random"):
        raise ValueError(f"unknown SID embedding init {init!r}; choose 'mean' or 'random'")
    tokens = vocab.tokens()
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False, single_word=False) for t in missing]
        )
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = model.get_input_embeddings().weight.shape[0]
    if new > old and init == "mean":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            mu, sd = emb[:old].mean(0), emb[:old].std(0)
            emb[old:] = mu + 0.5 * sd * torch.randn(new - old, emb.shape[1], generator=g)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != emb.data_ptr():
                mu, sd = out.weight[:old].mean(0), out.weight[:old].std(0)
                out.weight[old:] = mu + 0.5 * sd * torch.randn(new - old, out.weight.shape[1], generator=g)
    return tokenizer.convert_tokens_to_ids(tokens)


def sid_token_ids(tokenizer, vocab: SidVocab) -> list[np.ndarray]:
    """Per level: array (level_size,) of token ids for codes 0..K-1. Fails if a token is missing."""
    ids = tokenizer.convert_tokens_to_ids(vocab.tokens())
    unk = tokenizer.unk_token_id
    out, pos = [], 0
    for lv, n in enumerate(vocab.level_sizes):
        chunk = ids[pos : pos + n]
        pos += n
        if any(i is None for i in chunk):
            raise ValueError(f"tokenizer lacks SID tokens of level {lv}; call add_sid_tokens first")
        level_ids = np.asarray(chunk, dtype=np.int64)
        if (level_ids < 0).any() or (unk is not None and (level_ids == unk).any()):
            raise ValueError(f"tokenizer lacks SID tokens of level {lv}; call add_sid_tokens first")
        out.append(level_ids)
    return out

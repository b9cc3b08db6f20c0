"""SID tokens inside an LLM vocabulary: add them as normal tokens and look their ids up."""

from __future__ import annotations

import numpy as np
import torch

from sid_tokenizer.sid import SidVocab


def sid_token_collisions(tokenizer, tokens: list[str]) -> list[tuple[str, int]]:
    """SID token strings the tokenizer already has as its own tokens: (token, id) for those in its
    base vocabulary or among its *special* added tokens. Normal added tokens are not collisions
    (``add_sid_tokens`` adds SID tokens that way: a re-run finds its own tokens)."""
    added = tokenizer.get_added_vocab()
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {str(t) for t in decoder.values() if getattr(t, "special", False)}
    vocab = tokenizer.get_vocab()
    return [(t, vocab[t]) for t in tokens if t in vocab and (t not in added or t in special)]


def add_sid_tokens(
    model, tokenizer, vocab: SidVocab, init: str = "mean", seed: int = 0, model_name: str | None = None
) -> list[int]:
    """Add every SID token (as a normal added token, not special: decoding with
    ``skip_special_tokens=True`` keeps them) after the tokenizer's existing ids and make room for
    them in the embeddings.

    The matrix is never shrunk: a real checkpoint often has more rows than tokens (Qwen2.5: 151,936
    rows, 151,665 tokens), and SID tokens may land in those spare rows; the rows of the new ids are
    initialised either way. init: ``mean`` (mean of the existing tokens' rows + noise of half their
    std, so new rows start in-distribution), ``random`` (normal with the model's
    ``initializer_range``). Returns the SID token ids in vocabulary order. ValueError naming
    ``model_name`` when SID token strings already are tokens of that vocabulary.
    """
    from tokenizers import AddedToken

    if init not in ("mean", "random"):
        raise ValueError(f"unknown SID embedding init {init!r}; choose 'mean' or 'random'")
    tokens = vocab.tokens()
    clash = sid_token_collisions(tokenizer, tokens)
    if clash:
        shown = ", ".join(f"{t!r} (id {i})" for t, i in clash[:5])
        name = model_name or getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise ValueError(
            f"{name}: {len(clash)} SID token string(s) already are tokens of its vocabulary: {shown}"
            f"{', ...' if len(clash) > 5 else ''}. SID tokens must be new tokens with their own rows "
            "(else an item code would share the embedding of an existing token); use a tokenizer "
            "without these strings"
        )
    n_before = len(tokenizer)
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False, single_word=False) for t in missing]
        )
    new_ids = torch.as_tensor(tokenizer.convert_tokens_to_ids(missing), dtype=torch.long)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if len(new_ids):
        g = torch.Generator().manual_seed(seed)
        emb = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        mats = [emb] + ([out.weight] if out is not None and out.weight.data_ptr() != emb.data_ptr() else [])
        std = float(getattr(model.config, "initializer_range", 0.02))
        with torch.no_grad():
            for w in mats:
                shape = (len(new_ids), w.shape[1])
                if init == "mean":
                    real = w[:n_before].float()
                    mu, sd = real.mean(0), real.std(0)
                    vals = mu + 0.5 * sd * torch.randn(shape, generator=g)
                else:
                    vals = std * torch.randn(shape, generator=g)
                w[new_ids.to(w.device)] = vals.to(w.dtype).to(w.device)
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

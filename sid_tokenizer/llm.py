"""SID tokens inside a decoder-only LLM: the offline default model, adding SID tokens, checkpoints.

A sidrec checkpoint is a normal transformers model directory (``from_pretrained`` works, and
vLLM can serve it) plus a ``sidrec/`` folder holding what inference needs to map SIDs back
to items: ``index.json`` (item raw id -> SID tokens), ``items.jsonl`` (id, raw id, title,
categories) and ``meta.json`` (level sizes, SID dir, dataset dir, prompt format version).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.dataset import RecDataset
from data_prep.io import atomic_write_json, atomic_write_jsonl, read_json
from sid_tokenizer.sid import SidIndex, SidVocab

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Marks the start of a raw SID sequence (the seq2seq task's one-pass format, see data_prep.tasks).
REC_TOKEN = "<|rec|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", REC_TOKEN]


@dataclass
class ModelPreset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    text_vocab_size: int
    max_position_embeddings: int = 1024


# head_dim = hidden / heads >= 32 everywhere: vLLM's CPU attention supports 32, 64, 80, ... only.
PRESETS: dict[str, ModelPreset] = {
    # ~1.5M parameters plus embeddings: trains in minutes on 2 CPU cores
    "tiny": ModelPreset(128, 2, 2, 2, 384, 2048),
    # ~5M parameters: the demo default
    "small": ModelPreset(256, 4, 4, 2, 768, 3000),
    # ~30M parameters: quality runs on a GPU
    "base": ModelPreset(512, 8, 8, 4, 1536, 8000),
}


def train_catalogue_tokenizer(texts: list[str], vocab_size: int = 3000):
    """Byte-level BPE trained on the catalogue text, with a ChatML chat template.

    Returns a ``PreTrainedTokenizerFast`` whose special tokens are ``SPECIAL_TOKENS``
    (pad = eos = ``<|endoftext|>``... eos for chat turns is ``<|im_end|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>", REC_TOKEN])
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tokenizer_corpus(dataset: RecDataset) -> list[str]:
    """Text the default tokenizer is trained on: item titles/text plus the prompt templates."""
    from data_prep.tasks import PROMPTS

    texts = [it.text or it.title for it in dataset.items]
    texts += [p for templates in PROMPTS.values() for p in templates] * 20
    return texts


def build_default_model(dataset: RecDataset, preset: str = "small", seed: int = 0):
    """A Qwen2-architecture model initialised from scratch with a catalogue-trained tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    tokenizer = train_catalogue_tokenizer(tokenizer_corpus(dataset), p.text_vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=p.hidden_size, num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        intermediate_size=p.intermediate_size, max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, attention_dropout=0.1,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def add_sid_tokens(model, tokenizer, vocab: SidVocab, init: str = "mean", seed: int = 0) -> list[int]:
    """Add every SID token (as a normal added token, not special: decoding with
    ``skip_special_tokens=True`` keeps them) and resize the embeddings.

    init: ``mean`` (mean of existing rows + small noise, so new rows start in-distribution),
    ``random`` (the model's own initialiser). Returns the new token ids in vocabulary order.
    """
    from tokenizers import AddedToken

    tokens = vocab.tokens()
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False)
                              for t in missing])
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
    elif init not in ("mean", "random"):
        raise ValueError(f"unknown SID embedding init {init!r}; choose 'mean' or 'random'")
    return tokenizer.convert_tokens_to_ids(tokens)


def sid_token_ids(tokenizer, vocab: SidVocab) -> list[np.ndarray]:
    """Per level: array (level_size,) of token ids for codes 0..K-1. Fails if a token is missing."""
    ids = tokenizer.convert_tokens_to_ids(vocab.tokens())
    unk = tokenizer.unk_token_id
    out, pos = [], 0
    for lv, n in enumerate(vocab.level_sizes):
        level_ids = np.asarray(ids[pos:pos + n], dtype=np.int64)
        pos += n
        if (level_ids < 0).any() or (unk is not None and (level_ids == unk).any()) or any(
                i is None for i in ids):
            raise ValueError(f"tokenizer lacks SID tokens of level {lv}; call add_sid_tokens first")
        out.append(level_ids)
    return out


def save_catalogue(output_dir: str | Path, dataset: RecDataset, index: SidIndex, sid_dir: str | None,
                   dataset_dir: str | None) -> None:
    """Write ``<output_dir>/sidrec/`` so a checkpoint maps SIDs to items on its own."""
    d = Path(output_dir) / "sidrec"
    d.mkdir(parents=True, exist_ok=True)
    index.save(d / "index.json")
    atomic_write_jsonl(d / "items.jsonl", ({"item_id": it.item_id, "raw_id": it.raw_id, "title": it.title,
                                            "categories": it.categories} for it in dataset.items))
    atomic_write_json(d / "meta.json", {"level_sizes": list(index.vocab.level_sizes), "sid_dir": sid_dir,
                                        "dataset_dir": dataset_dir, "num_items": len(index),
                                        "rec_token": REC_TOKEN, "format_version": 1})


@dataclass
class Catalogue:
    """What a checkpoint knows about its items: SID index + titles/categories."""

    index: SidIndex
    titles: list[str]
    categories: list[list[str]]
    raw_ids: list[str]

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> Catalogue:
        d = Path(checkpoint_dir) / "sidrec"
        meta = read_json(d / "meta.json")
        rows = [json.loads(line) for line in open(d / "items.jsonl", encoding="utf-8") if line.strip()]
        raw_ids = [r["raw_id"] for r in rows]
        index = SidIndex.load(d / "index.json", raw_ids=raw_ids, level_sizes=tuple(meta["level_sizes"]))
        return cls(index=index, titles=[r["title"] for r in rows],
                   categories=[r.get("categories", []) for r in rows], raw_ids=raw_ids)


def copy_catalogue(src_checkpoint: str | Path, dst_checkpoint: str | Path) -> None:
    shutil.copytree(Path(src_checkpoint) / "sidrec", Path(dst_checkpoint) / "sidrec", dirs_exist_ok=True)


def prepare_base_checkpoint(init_dir: str | Path, dataset: RecDataset, index: SidIndex,
                            model_name_or_path: str | None, preset: str = "small", sid_init: str = "mean",
                            seed: int = 0, trust_remote_code: bool = False, sid_dir: str | None = None,
                            dataset_dir: str | None = None) -> Path:
    """Create (once) the checkpoint training starts from: base model + SID tokens, resized.

    ``model_name_or_path`` None or ``"default"`` builds the offline default (a Qwen2 model
    with a catalogue-trained tokenizer, ``preset`` size); anything else is loaded with
    transformers (HF id or local path). Written atomically, so a killed run never leaves a
    half-saved base; a second call reuses it (this is what makes training resumable: SFTTrainer
    does not resize embeddings itself).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.io import atomic_directory

    init_dir = Path(init_dir)
    if (init_dir / "sidrec" / "meta.json").exists():
        logger.info("reusing base checkpoint %s", init_dir)
        return init_dir
    if model_name_or_path in (None, "", "default"):
        model, tokenizer = build_default_model(dataset, preset=preset, seed=seed)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                                     torch_dtype="auto")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.add_tokens([REC_TOKEN], special_tokens=True)
    add_sid_tokens(model, tokenizer, index.vocab, init=sid_init, seed=seed)
    with atomic_directory(init_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_catalogue(tmp, dataset, index, sid_dir=sid_dir, dataset_dir=dataset_dir)
    return init_dir


def load_checkpoint(path: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, Catalogue) from a sidrec checkpoint directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype or "auto")
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer, Catalogue.load(path)

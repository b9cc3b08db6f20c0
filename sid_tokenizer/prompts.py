"""Every prompt sidrec shows a model, in one place: training tasks and inference use these.

- ``REC_TOKEN`` + SIDs: the raw seq2seq format (``<|rec|><a_1><b_2><c_3>...``) that SFT's
  ``seq2seq`` task trains on and that evaluation, RL, batch export and the completion API rank with.
- ``PROMPTS``: the chat templates of each instruction task (LC-Rec style, one table keyed by task).
- ``CHATML_TEMPLATE`` / ``SPECIAL_TOKENS``: the offline default tokenizer's chat format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sid_tokenizer.sid import SidIndex

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Marks the start of a raw SID sequence (the seq2seq task's one-pass format).
REC_TOKEN = "<|rec|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", REC_TOKEN]
PROMPT_FORMATS = ("seq2seq", "chat")

PROMPTS: dict[str, list[str]] = {
    "seq2seq_chat": [
        "A user bought these items in order: {history}. Which item will the user buy next?",
        "Purchase history: {history}. Recommend the next item.",
        "Given the interaction history {history}, predict the next item the user will interact with.",
    ],
    "sid2title": [
        "What is the title of item {sid}?",
        "Which product has the ID {sid}?",
    ],
    "title2sid": [
        'What is the ID of the item "{title}"?',
        'Give the item ID of "{title}".',
    ],
    "title_history2sid": [
        "A user bought these items in order: {titles}. Which item will the user buy next?",
        "I liked {titles}. Suggest something.",
    ],
    "sid_history2title": [
        "A user bought these items in order: {history}. What is the title of the item the user will buy next?",
    ],
    "intent2sid": [
        "I am looking for {intent}. Which item do you recommend?",
        "Recommend an item: I need {intent}.",
    ],
}


def sid_sequence_prompt(sids: Sequence[str]) -> str:
    """``<|rec|>`` followed by the given SID strings: the raw seq2seq prompt."""
    return REC_TOKEN + "".join(sids)


def seq2seq_prompt(index: SidIndex, history: Sequence[int], max_history: int = 20) -> str:
    """The raw seq2seq prompt for a history of item ids: ``<|rec|>`` + the last ``max_history`` SIDs."""
    return sid_sequence_prompt([index.sid(i) for i in list(history)[-max_history:]])


def chat_history_prompt(index: SidIndex, history: Sequence[int], max_history: int = 20) -> list[dict]:
    """The chat form of the same request (the ``seq2seq_chat`` task's first template)."""
    sids = ", ".join(index.sid(i) for i in list(history)[-max_history:])
    return [{"role": "user", "content": PROMPTS["seq2seq_chat"][0].format(history=sids)}]


def history_prompt(index: SidIndex, history: Sequence[int], max_history: int, prompt_format: str) -> Any:
    """The prompt for a history in ``prompt_format``: ``seq2seq`` (raw text) or ``chat`` (messages)."""
    if prompt_format == "seq2seq":
        return seq2seq_prompt(index, history, max_history)
    if prompt_format == "chat":
        return chat_history_prompt(index, history, max_history)
    raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def prompt_text(prompt: Any, tokenizer) -> str:
    """Text fed to the model: the raw prompt, or a chat prompt rendered with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

"""Byte-level BPE tokenizer (tokenizers), saved as a transformers tokenizer with the chat template.

Special tokens: <|endoftext|> (end of text: between documents, after every response; also BOS),
<|pad|>, and the instruction template's role markers <|system|>, <|user|>, <|assistant|>.

The one prompt template (also the tokenizer's chat_template):

    <|user|>
    {instruction}
    <|assistant|>
    {response}<|endoftext|>

A system message, when present, comes first as "<|system|>\\n{content}\\n".
"""

from __future__ import annotations

from typing import Iterable

EOS, PAD, SYSTEM, USER, ASSISTANT = "<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [EOS, PAD, SYSTEM, USER, ASSISTANT]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{{ '<|endoftext|>' if message['role'] == 'assistant' else '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)


def role_prefix(role: str) -> str:
    return f"<|{role}|>\n"


def render_turn(role: str, content: str) -> str:
    """One message exactly as CHAT_TEMPLATE renders it."""
    return role_prefix(role) + content + (EOS if role == "assistant" else "\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return wrap(core)


def wrap(core):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


def ensure_chat_tokens(tokenizer) -> None:
    """A checkpoint from elsewhere (init_from) keeps its own chat template; one without a template gets
    ours and its role tokens. Either way it has a pad token (its end-of-text when it has a template)."""
    if tokenizer.chat_template:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return
    missing = [t for t in [PAD, SYSTEM, USER, ASSISTANT] if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    tokenizer.chat_template = CHAT_TEMPLATE

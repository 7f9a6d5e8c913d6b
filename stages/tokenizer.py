"""Tokenizer stage: byte-level BPE trained with HF `tokenizers` on the recipe's corpus.

    python -m stages.tokenizer recipes/tiny.yaml [stages.tokenizer.vocab_size=4096]

Output `tokenizer/` loads with `AutoTokenizer.from_pretrained`. Byte-level BPE never needs an unknown
token, so `decode(encode(text)) == text` for any Unicode text. Special tokens: `<|bos|>`, `<|eos|>`
(end of a document), `<|pad|>` and the chat markers `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`
(end of a turn). The chat template marks assistant turns with `{% generation %}` so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` gives the SFT loss mask.
"""

from __future__ import annotations

import logging
import time

from pipeline.data.sources import load_dataset_input, require_columns
from pipeline.recipe.stages import TokenizerSettings
from pipeline.runner.stage import StageContext, stage_main

log = logging.getLogger("pipeline")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_TOKENS]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts, vocab_size: int, min_frequency: int):
    """A `PreTrainedTokenizerFast` with byte-level BPE trained on an iterator of strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=CHAT_TOKENS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return n_bytes / max(n_tokens, 1)


def take_chars(texts, limit: int):
    used = 0
    for text in texts:
        if used >= limit:
            return
        text = text[: limit - used]
        used += len(text)
        yield text


def run(ctx: StageContext[TokenizerSettings]) -> None:
    s = ctx.settings
    corpus = load_dataset_input(ctx.inputs["corpus"], s.validation_fraction, ctx.seed)
    require_columns(corpus, ["text"], ctx.inputs["corpus"])
    train = corpus["train"].shuffle(seed=ctx.seed)
    start = time.time()
    log.info("training byte-level BPE, vocab %d, on up to %d chars of %d documents", s.vocab_size,
             s.max_train_chars, len(train))
    tokenizer = train_tokenizer(take_chars(train["text"], s.max_train_chars), s.vocab_size, s.min_frequency)
    seconds = time.time() - start
    tokenizer.save_pretrained(ctx.output_dir("tokenizer"))
    bpt = bytes_per_token(tokenizer, list(corpus["validation"]["text"]))
    ctx.metrics.update(vocab_size=len(tokenizer), bytes_per_token_validation=round(bpt, 4),
                       train_seconds=round(seconds, 2))
    log.info("vocab %d, %.3f bytes/token on validation, trained in %.1f s", len(tokenizer), bpt, seconds)


if __name__ == "__main__":
    stage_main("tokenizer", run)

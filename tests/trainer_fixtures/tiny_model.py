"""A tiny Llama-shaped model and a word-level tokenizer with a chat template, built in-process.

No model hub is reachable in CI, so the tests make their own base model: random weights, real
Llama architecture, saved as safetensors like any s3:// model folder.
"""

import random
from pathlib import Path

# A learnable task: each thing has a fixed colour, and the answer repeats the question's subject.
# The reply template alone is learnable in a few dozen steps; the colours take longer.
THINGS = ["apple", "sky", "grass", "snow", "coal", "sun", "sea", "rose", "lime", "plum", "sand", "ash",
          "milk", "ink", "rust", "gold", "moss", "clay", "pearl", "jade"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "teal", "pink", "olive", "purple", "beige", "grey"]
FILLER = ["what", "colour", "is", "the", "of", "a", "tell", "me", "please", "answer", "it"]
SPECIAL = ["[PAD]", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def colour_of(thing: str) -> str:
    return COLOURS[THINGS.index(thing) % len(COLOURS)]


def build_tokenizer(dest: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(THINGS + COLOURS + FILLER)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="[PAD]",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(dest))
    return fast


def build_model(dest: Path, seed: int = 0, hidden: int = 64, layers: int = 2, initializer_range: float = 0.3):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # Wide enough that a frozen random output head can express confident predictions (with
        # the default 0.02, logits of a 64-wide model stay within about +-1.3).
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(dest), safe_serialization=True)
    return model, tokenizer


def chat_record(thing: str, rng: random.Random) -> dict:
    question = rng.choice([f"what colour is the {thing}", f"tell me the colour of the {thing}",
                           f"what is the colour of a {thing} please"])
    return {"messages": [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"the {thing} is {colour_of(thing)}"},
    ]}


def chat_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [chat_record(rng.choice(THINGS), rng) for _ in range(n)]

"""Tiny random causal LMs and a tiny byte-level BPE tokenizer, built offline from configs for unit tests.

``tiny_tokenizer()`` is a GPT-2-style byte-level BPE (leading-space tokens, ``<|endoftext|>`` as bos/eos, a separate
``<|pad|>``) trained in a few milliseconds on fixed English sentences about capitals, languages and people.
``tiny_model(arch, seed)`` builds a random float32 model of one of :data:`TINY_ARCHS` in eval mode; the same
``(arch, seed)`` always gives the same weights. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import itertools
from pathlib import Path
from typing import Any

import torch

TINY_ARCHS: tuple[str, ...] = ("gpt2", "llama", "gptj", "gpt_neox", "qwen2", "mistral", "gemma")

_HIDDEN = 64
_LAYERS = 4
_HEADS = 4
_INTERMEDIATE = 128
_POSITIONS = 128

_COUNTRIES = [
    ("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
    ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("China", "Beijing", "Chinese"),
    ("Russia", "Moscow", "Russian"), ("Greece", "Athens", "Greek"), ("Egypt", "Cairo", "Arabic"),
    ("Brazil", "Brasilia", "Portuguese"), ("Canada", "Ottawa", "English"), ("Sweden", "Stockholm", "Swedish"),
    ("Poland", "Warsaw", "Polish"), ("Turkey", "Ankara", "Turkish"), ("Kenya", "Nairobi", "Swahili"),
    ("Peru", "Lima", "Spanish"), ("Norway", "Oslo", "Norwegian"), ("Finland", "Helsinki", "Finnish"),
]
_PEOPLE = [
    ("Danielle Darrieux", "actor", "Paris"), ("Edwin of Northumbria", "king", "York"),
    ("Toko Yasuda", "musician", "Tokyo"), ("Albert Einstein", "physicist", "Berlin"),
    ("Marie Curie", "chemist", "Warsaw"), ("Leonardo da Vinci", "painter", "Rome"),
    ("Ada Lovelace", "mathematician", "London"), ("Miles Davis", "trumpeter", "New York"),
    ("Pablo Picasso", "painter", "Madrid"), ("Haruki Murakami", "writer", "Tokyo"),
    ("Lionel Messi", "footballer", "Barcelona"), ("Steve Jobs", "businessman", "Cupertino"),
]
_EXTRA = (
    "The Eiffel Tower is located in Paris. The Colosseum is in Rome. Apple was founded by Steve Jobs. "
    "Windows is developed by Microsoft. The iPhone is made by Apple. The Amazon river flows through Brazil. "
    "The mother tongue of Danielle Darrieux is French. Toko Yasuda plays the guitar. "
    "What is the capital of France? Who founded Microsoft? Bill Gates founded Microsoft. "
    "The official religion of Edwin of Northumbria is Christianity. Football is a popular sport in Spain. "
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000 1999 2024."
)


def _corpus() -> list[str]:
    lines: list[str] = []
    for country, capital, language in _COUNTRIES:
        lines += [
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital city of {country}.",
            f"The official language of {country} is {language}.",
            f"People in {country} speak {language}.",
            f"{capital} is a large city in {country}.",
        ]
    for (name, job, city), (country, _, language) in zip(_PEOPLE, itertools.cycle(_COUNTRIES)):
        lines += [
            f"{name} is a {job}.",
            f"{name} was born in {city}.",
            f"{name} works as a {job} in {city}.",
            f"{name} speaks {language} and lives in {country}.",
            f"The profession of {name} is {job}.",
        ]
    lines += [s.strip() + "." for s in _EXTRA.split(".") if s.strip()]
    return lines


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A GPT-2-like byte-level BPE tokenizer (~600 tokens) trained offline; one instance per process.

    Callers that change ``padding_side`` should set it back (or copy the tokenizer) since the instance is shared.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>", model_max_length=_POSITIONS,
                                   clean_up_tokenization_spaces=False)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer():
    """A copy of the tiny tokenizer with a ChatML template (its turn markers are plain text to it)."""
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHATML
    return tok


def _config(arch: str, vocab: int, eos: int, pad: int):
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
    llama_like = dict(hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
                      num_attention_heads=_HEADS, num_key_value_heads=2, max_position_embeddings=_POSITIONS,
                      tie_word_embeddings=False, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_inner=_INTERMEDIATE,
                             n_positions=_POSITIONS, **common)
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=_HIDDEN, n_layer=_LAYERS, n_head=_HEADS, n_inner=_INTERMEDIATE,
                             n_positions=_POSITIONS, rotary_dim=8, tie_word_embeddings=False, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=_HIDDEN, intermediate_size=_INTERMEDIATE, num_hidden_layers=_LAYERS,
                                num_attention_heads=_HEADS, max_position_embeddings=_POSITIONS,
                                tie_word_embeddings=False, **common)
    if arch == "llama":
        return tf.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if arch == "mistral":
        return tf.MistralConfig(sliding_window=None, **llama_like)
    if arch == "gemma":
        return tf.GemmaConfig(head_dim=_HIDDEN // _HEADS, **{**llama_like, "tie_word_embeddings": True})
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")


def tiny_model(arch: str, seed: int = 0):
    """A random causal LM of ``arch`` (one of :data:`TINY_ARCHS`) and :func:`tiny_tokenizer`; float32, eval mode.

    Deterministic given ``seed``; the global torch RNG is saved and put back, so callers' randomness is untouched.
    """
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = _config(arch, len(tok), tok.eos_token_id, tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


@functools.lru_cache(maxsize=1)
def smollm2():
    """The real default model, SmolLM2-135M-Instruct, loaded once per process (for integration tests).

    The first call on a machine converts the GGUF file into the editmem cache (about 15-20 s); later calls load the
    cached folder. The instance is shared: a test that edits it must restore it.
    """
    from editors.lm.loading import load_model

    return load_model("smollm2-135m")


def save_folder(model: torch.nn.Module, tokenizer: Any, folder: Path) -> Path:
    """``model`` and ``tokenizer`` saved as a local Hugging Face folder (what ``--model`` accepts); returns it."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer, to check later that the model is bit-identical."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter and buffer equals ``saved`` exactly (``torch.equal``)."""
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k], v) for k, v in saved.items())


def target_logprobs(model: torch.nn.Module, tok, requests) -> torch.Tensor:
    """Log-probability of each request's target after its prompt (teacher-forced), one value per request."""
    from editors.lm.tokens import encode_batch, target_logprob

    batch = encode_batch(tok, [r.prompt for r in requests], [r.target_new for r in requests])
    with torch.no_grad():
        return target_logprob(model(**batch.model_inputs()).logits, batch.labels)

"""A small Phi-3-shaped tokenizer.json for the tests, built with `tokenizers`.

Llama-style BPE with byte fallback (`<0x00>`..`<0xFF>`), SentencePiece's `▁` for spaces, and Phi-3's added
tokens with their flags: `</s>` rstrip and not special, the role tokens and `<|end|>` rstrip and special,
`<|endoftext|>` special without rstrip (as in Phi-3-mini-4k-instruct's tokenizer.json on the Hub).
"""

from __future__ import annotations

import json
from pathlib import Path

# The Jinja sources of Phi-3's templates, verbatim from each model's tokenizer_config.json on the Hub.
CURRENT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI35_TEMPLATE = CURRENT_TEMPLATE.replace(
    "{% if message['role'] == 'system' %}", "{% if message['role'] == 'system' and message['content'] %}"
)
APRIL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + "
    "message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}"
    "{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}"
)
ADDED = [  # (token, rstrip, special)
    ("<|endoftext|>", False, True),
    ("<|assistant|>", True, True),
    ("<|system|>", True, True),
    ("<|end|>", True, True),
    ("<|user|>", True, True),
]


def build_tokenizer_json(path: Path) -> None:
    """Write a tokenizer.json: 3 specials, 256 byte tokens, letters/digits/punctuation, a few merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    chars = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,?!'+-*="
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "s"), ("▁", "W"), ("a", "t"), ("▁W", "h"),
              ("▁Wh", "at"), ("▁", "i"), ("▁i", "s"), ("o", "f"), ("▁", "o"), ("▁o", "f")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<unk>", special=True, normalized=False),
                            AddedToken("<s>", special=True, normalized=False)])
    tok.add_tokens([AddedToken("</s>", rstrip=True, special=False, normalized=False)])
    for token, rstrip, special in ADDED:
        tok.add_special_tokens([AddedToken(token, rstrip=rstrip, special=special, normalized=False)])
    tok.save(str(path))


def write_tokenizer_dir(directory: Path, chat_template: str | None = CURRENT_TEMPLATE) -> Path:
    """tokenizer.json plus a Phi-3 tokenizer_config.json (no BOS/EOS added, pad <|endoftext|>)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer_json(directory / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "unk_token": "<unk>", "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 4096}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory

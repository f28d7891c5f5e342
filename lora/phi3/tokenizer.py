"""Tokenizers for Phi-3 chat training: a compact byte-level one and a loader for a checkpoint's `tokenizer.json`.

Both encode text without adding any special token (the chat template writes `<s>` itself where it wants
one) and match Phi-3's special tokens atomically. Role tokens and `<|end|>` carry `rstrip`: they absorb the
whitespace that follows them, so `"<|user|>\\nHi<|end|>\\n"` has no newline tokens (the flags of
Phi-3-mini-4k-instruct's `tokenizer.json` on the Hub).

    tok = ByteTokenizer()
    tok.encode("<|user|>\\nHi<|end|>\\n") == [263, 72, 105, 262]
    tok = load_tokenizer("Phi-3-mini-4k-instruct")     # tokenizer.json through the `tokenizers` package
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

from lora.phi3.config import read_json

__all__ = [
    "BYTE_TOKENIZER_FILE",
    "SPECIAL_TOKENS",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "load_tokenizer",
]

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
# Phi-3's special tokens that the chat template and generation use, in the order of their Phi-3 ids
# (0, 1, 2, 32000, 32001, 32006, 32007, 32010), with `rstrip` as in Phi-3's tokenizer_config.json.
SPECIAL_TOKENS: dict[str, bool] = {
    "<unk>": False,
    "<s>": False,
    "</s>": True,
    "<|endoftext|>": False,
    "<|assistant|>": True,
    "<|system|>": True,
    "<|end|>": True,
    "<|user|>": True,
}


class Tokenizer(Protocol):
    """What the chat and data code needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings matched atomically, nothing added."""
        ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """Id of a (special) token, None if unknown."""
        ...


class ByteTokenizer:
    """The 256 bytes (ids 0-255) plus Phi-3's chat special tokens (ids 256-263): 264 ids in all.

    `encode(s)` is the UTF-8 bytes of `s` with special-token strings replaced by their ids; the
    whitespace after an `rstrip` token is dropped, as Phi-3's tokenizer does.
    Example: `ByteTokenizer().encode("<|end|>\\nA")` is `[262, 65]`.
    """

    def __init__(self) -> None:
        self.specials = {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(self.specials)
        self._by_id = {i: token for token, i in self.specials.items()}
        # Longest first so that no special token is cut by a shorter one that prefixes it.
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(name) for name in names) + ")")

    def encode(self, text: str) -> list[int]:
        """Bytes of `text`, special tokens as single ids, whitespace after rstrip tokens dropped."""
        ids: list[int] = []
        strip_next = False
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:  # odd pieces are the matched special tokens
                ids.append(self.specials[piece])
                strip_next = SPECIAL_TOKENS[piece]
                continue
            if strip_next:
                piece = piece.lstrip()
            ids.extend(piece.encode("utf-8"))
            strip_next = False
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """UTF-8 text of the byte ids (invalid sequences become U+FFFD); special ids as their names or skipped."""
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if not skip_special_tokens:
                out.append(self._by_id.get(i, "<unk>"))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, None for anything else."""
        return self.specials.get(token)

    def save(self, directory: str | Path) -> None:
        """Write `byte_tokenizer.json` into a checkpoint directory, so `load_tokenizer` finds this tokenizer."""
        description = {"type": "bytes", "byte_ids": [0, 255], "special_tokens": self.specials}
        (Path(directory) / BYTE_TOKENIZER_FILE).write_text(json.dumps(description, indent=2) + "\n")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` package (the `tokenizers` extra).

    Encodes with `add_special_tokens=False`: transformers rebuilds the post-processor from
    tokenizer_config.json (Phi-3: no BOS, no EOS), so the file's own post-processor is not what
    `apply_chat_template` uses; the chat template adds `<s>` itself when it wants one.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as err:
            raise ImportError(
                "reading tokenizer.json needs the `tokenizers` package: pip install 'purelora[tokenizers]'"
            ) from err
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a readable tokenizer.json ({err})") from err
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added tokens matched with their lstrip/rstrip flags; no BOS/EOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of `token` in the vocabulary or the added tokens, None if absent."""
        return self._tok.token_to_id(token)


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a checkpoint directory: `tokenizer.json` if present, else our `byte_tokenizer.json`.

    Raises FileNotFoundError naming both files when neither is there.
    """
    root = Path(directory)
    if (root / "tokenizer.json").is_file():
        return HFTokenizer(root / "tokenizer.json")
    if (root / BYTE_TOKENIZER_FILE).is_file():
        description: dict[str, Any] = read_json(root / BYTE_TOKENIZER_FILE)
        tokenizer = ByteTokenizer()
        if not isinstance(description, dict):
            raise ValueError(f"{root / BYTE_TOKENIZER_FILE}: expected a JSON object, got {type(description).__name__}")
        if description.get("special_tokens") != tokenizer.specials:
            raise ValueError(f"{root / BYTE_TOKENIZER_FILE}: special token ids differ from this version's")
        return tokenizer
    raise FileNotFoundError(f"{root}: no tokenizer.json (nor {BYTE_TOKENIZER_FILE}); a Phi-3 checkpoint ships one")

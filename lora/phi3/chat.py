"""Phi-3's chat templates, conversation checks, and tokenisation with assistant-only loss labels.

Rendered training text (current template, no generation prompt):

    <|system|>\\nS<|end|>\\n<|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n<|endoftext|>

The April 2024 template has a leading `<s>`, no system role, and `<|assistant|>\\n` right after each user
turn. `render` reproduces transformers' `apply_chat_template` string for string; `encode_chat` tokenises
that string (so ids equal `apply_chat_template(..., tokenize=True)`) and labels exactly what each assistant
message put into it, its content and the `<|end|>` closing it, so the model learns the answers and when to
stop. Turns may come in any order: under the April template two assistant turns in a row render as
`A1<|end|>\\nA2<|end|>\\n` (no role token between, as transformers renders them), and both are labelled.

    ids, labels = encode_chat(tokenizer, [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"}], PHI3)
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora.phi3.config import read_json
from lora.phi3.loss import IGNORE_INDEX
from lora.phi3.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PHI3",
    "PHI3_2024_04",
    "PHI3_5",
    "PHI3_MEDIUM_2024_04",
    "ROLES",
    "TEMPLATES",
    "ChatTemplate",
    "check_conversation",
    "encode_chat",
    "encode_prompt",
    "render",
    "stop_token_ids",
    "template_from_checkpoint",
    "template_from_jinja",
]

ROLES = ("system", "user", "assistant")
# The special tokens a template writes (not `<unk>`, which a tokenizer may also give for unknown text).
_TEMPLATE_TOKEN = re.compile("|".join(re.escape(t) for t in
                                      ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|user|>", "<|end|>", "<s>")))


@dataclass(frozen=True)
class ChatTemplate:
    """One of Phi-3's chat templates, as flags (their Jinja sources: the `chat_template` of each model's
    `tokenizer_config.json` on the Hub, quoted in tests/phi3/phi3_tokenizer.py).

    `bos`: text starts with `<s>`. `system_role`: system turns are rendered (else dropped, as the April
    template does). `skip_empty_system`: an empty system turn is dropped (Phi-3.5). `prompt_after_user`:
    `<|assistant|>\\n` follows every user turn and assistant turns are bare `content<|end|>\\n` (April).
    `eos_at_end`: `<|endoftext|>` ends the text when no generation prompt is asked for (current).
    """

    name: str
    bos: bool
    system_role: bool
    skip_empty_system: bool
    prompt_after_user: bool
    eos_at_end: bool


PHI3 = ChatTemplate("phi3", bos=False, system_role=True, skip_empty_system=False, prompt_after_user=False,
                    eos_at_end=True)
PHI3_5 = ChatTemplate("phi3.5", bos=False, system_role=True, skip_empty_system=True, prompt_after_user=False,
                      eos_at_end=True)
PHI3_2024_04 = ChatTemplate("phi3-2024-04", bos=True, system_role=False, skip_empty_system=False,
                            prompt_after_user=True, eos_at_end=False)
PHI3_MEDIUM_2024_04 = ChatTemplate("phi3-medium-2024-04", bos=False, system_role=False, skip_empty_system=False,
                                   prompt_after_user=True, eos_at_end=False)
TEMPLATES = {t.name: t for t in (PHI3, PHI3_5, PHI3_2024_04, PHI3_MEDIUM_2024_04)}


def template_from_jinja(source: str | None) -> ChatTemplate:
    """Which Phi-3 template a `chat_template` Jinja string is; None (no template) gives the current one.

    Recognised by its parts: no `'system'` branch means April 2024 (with `<s>` if it names `bos_token`);
    a system branch that also tests `message['content']` is Phi-3.5's. Anything without `<|user|>` and
    `<|end|>` is not a Phi-3 template: ValueError.
    """
    if source is None:
        return PHI3
    if "<|user|>" not in source or "<|end|>" not in source:
        raise ValueError(f"chat_template is not a Phi-3 template (no <|user|>/<|end|>): {source[:120]!r}...")
    if "'system'" not in source:
        return PHI3_2024_04 if "bos_token" in source else PHI3_MEDIUM_2024_04
    if re.search(r"==\s*'system'\s+and\s+message\['content'\]", source):
        return PHI3_5
    return PHI3


def template_from_checkpoint(directory: str | Path) -> ChatTemplate:
    """The chat template a checkpoint directory declares (`chat_template.jinja`, else tokenizer_config.json).

    Checkpoints without one (our embedded tiny model) get the current Phi-3 template.
    """
    root = Path(directory)
    if (root / "chat_template.jinja").is_file():
        return template_from_jinja((root / "chat_template.jinja").read_text())
    config_path = root / "tokenizer_config.json"
    if not config_path.is_file():
        return PHI3
    config: dict[str, Any] = read_json(config_path)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    return template_from_jinja(source)


def check_conversation(messages: Any, where: str) -> list[dict[str, str]]:
    """Validate one conversation; errors start with `where` (say `"train.jsonl:12"`).

    Each message is `{"role": "system" | "user" | "assistant", "content": str}`; at least one assistant
    turn; no content may contain a special-token string (it would be read as a control token).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's "\ud800": a lone surrogate, which no tokenizer can encode
            raise ValueError(f"{where}: message {i} content is not valid Unicode: lone surrogate "
                             f"{content[err.start]!r} at character {err.start}") from err
        special = next((token for token in SPECIAL_TOKENS if token in content), None)
        if special is not None:
            raise ValueError(f"{where}: message {i} contains the special token {special}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: conversation has no assistant turn: nothing to learn from")
    return messages


def _parts(
    messages: list[dict[str, str]],
    template: ChatTemplate,
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "<s>",
    eos_token: str = "<|endoftext|>",
) -> list[tuple[str, bool]]:
    """The rendered text as `(text, trained)` pieces, in order: `trained` marks what an assistant message
    contributes that the model learns (its content and the `<|end|>\\n` closing it, never a role token).

    Every piece ends with a template token (and the newline it absorbs), so a trained piece starts and
    ends right after one, or at the start of the text: `encode_chat` relies on this to find its tokens.
    """
    parts = [(bos_token, False)] if template.bos else []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            if template.system_role and not (template.skip_empty_system and not content):
                parts.append((f"<|system|>\n{content}<|end|>\n", False))
        elif role == "user":
            parts.append((f"<|user|>\n{content}<|end|>\n", False))
            if template.prompt_after_user:
                parts.append(("<|assistant|>\n", False))
        elif role == "assistant":
            if not template.prompt_after_user:
                parts.append(("<|assistant|>\n", False))
            parts.append((f"{content}<|end|>\n", True))
    if not template.prompt_after_user:
        if add_generation_prompt:
            parts.append(("<|assistant|>\n", False))
        elif template.eos_at_end:
            parts.append((eos_token, False))
    return parts


def render(
    messages: list[dict[str, str]],
    template: ChatTemplate = PHI3,
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "<s>",
    eos_token: str = "<|endoftext|>",
) -> str:
    """The text transformers' `apply_chat_template(messages, tokenize=False, ...)` gives for `template`.

    Example: `render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)` is
    `"<|user|>\\nHi<|end|>\\n<|assistant|>\\n"`.
    """
    parts = _parts(messages, template, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                   eos_token=eos_token)
    return "".join(text for text, _ in parts)


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    """Id of a special token the labelling needs; a tokenizer without it is not Phi-3's."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token; it is not a Phi-3 chat tokenizer")
    return token_id


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], template: ChatTemplate = PHI3
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels: the id on assistant tokens, -100 elsewhere.

    Labelled: each assistant message's content and the `<|end|>` that closes it, found from what the
    message contributed to the rendered text (so consecutive turns of one role label right under every
    template). Not labelled: system and user turns, role tokens (also the April template's
    `<|assistant|>` after each user turn), `<s>`, the final `<|endoftext|>`.
    Example (byte tokenizer): `...<|assistant|> O K <|end|> <|endoftext|>` labels `O K <|end|>`.
    """
    parts = _parts(messages, template)
    text = "".join(piece for piece, _ in parts)
    ids = tokenizer.encode(text)
    # Each trained piece starts and ends right after a template token (or at 0), and the tokenizer
    # matches those atomically: a boundary's token offset is the one after the k-th template-token id,
    # k the template-token strings in the text before it.
    matches = list(_TEMPLATE_TOKEN.finditer(text))
    anchors = {_special_id(tokenizer, t) for t in {"<|assistant|>", "<|end|>", *(m.group() for m in matches)}}
    ends = [m.end() for m in matches]  # character offsets after each template token
    after = [i + 1 for i, token in enumerate(ids) if token in anchors]  # token offsets after each
    if len(after) != len(ends):
        raise ValueError(f"the tokenizer gave {len(after)} ids of template tokens for {len(ends)} in the text; "
                         "it does not match Phi-3's special tokens atomically")

    def token_offset(char: int) -> int:
        k = bisect.bisect_right(ends, char)
        return after[k - 1] if k else 0

    labels = [IGNORE_INDEX] * len(ids)
    start = 0
    for piece, trained in parts:
        if trained:
            first, last = token_offset(start), token_offset(start + len(piece))
            labels[first:last] = ids[first:last]
        start += len(piece)
    return ids, labels


def encode_prompt(tokenizer: Tokenizer, messages: list[dict[str, str]], template: ChatTemplate = PHI3) -> list[int]:
    """Token ids of a prompt for generation: the conversation so far, ending with `<|assistant|>`."""
    return tokenizer.encode(render(messages, template, add_generation_prompt=True))


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Phi-3's stop ids in this tokenizer: `<|endoftext|>`, `<|assistant|>`, `<|end|>` (those it has)."""
    ids = (tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|end|>"))
    return [i for i in ids if i is not None]

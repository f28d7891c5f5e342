"""Chat templates and tokenisation: parity with transformers' apply_chat_template, labels, checks."""

from __future__ import annotations

import json
import re

import pytest
from phi3_tokenizer import APRIL_TEMPLATE, CURRENT_TEMPLATE, PHI35_TEMPLATE, write_tokenizer_dir

from lora.phi3.chat import (
    IGNORE_INDEX,
    PHI3,
    PHI3_5,
    PHI3_2024_04,
    PHI3_MEDIUM_2024_04,
    check_conversation,
    encode_chat,
    encode_prompt,
    render,
    stop_token_ids,
    template_from_checkpoint,
    template_from_jinja,
)
from lora.phi3.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are kind."},
    {"role": "user", "content": "What is 2 + 3?\n"},
    {"role": "assistant", "content": "  2 + 3 = 5. Ünïcode ✓"},
    {"role": "user", "content": "the end"},
    {"role": "assistant", "content": "What of it"},
]
# Turns of one role in a row, which the April template renders with no role token between assistant turns.
USER_USER = [{"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"},
             {"role": "assistant", "content": " A"}]
ASSISTANT_ASSISTANT = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                       {"role": "assistant", "content": "A2"}]
SYSTEM_ASSISTANT = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A0"},
                    {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_byte_tokenizer_matches_special_tokens_and_rstrip():
    tok = ByteTokenizer()
    assert tok.vocab_size == 264
    assert tok.encode("<|user|>\nHi<|end|>\n") == [263, 72, 105, 262]
    # Only rstrip tokens absorb whitespace; <|endoftext|> does not.
    assert tok.encode("<|endoftext|> a") == [259, 32, 97]
    text = "<s>héllo ✓<|assistant|>x"
    assert tok.decode(tok.encode(text)) == "<s>héllo ✓<|assistant|>x"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "héllo ✓x"
    assert stop_token_ids(tok) == [259, 260, 262]
    assert tok.token_to_id("<unk>") == 256 and tok.token_to_id("a") is None


def test_byte_tokenizer_round_trips_through_a_checkpoint_directory(tmp_path):
    ByteTokenizer().save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "byte_tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match=r"byte_tokenizer.json: expected a JSON object, got list"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("jinja", "template"),
    [(CURRENT_TEMPLATE, PHI3), (PHI35_TEMPLATE, PHI3_5), (APRIL_TEMPLATE, PHI3_2024_04),
     (APRIL_TEMPLATE.replace("{{ bos_token }}", ""), PHI3_MEDIUM_2024_04)],
    ids=["current", "phi3.5", "april-2024", "medium-april-2024"],
)
def test_ids_equal_transformers_apply_chat_template(tmp_path, jinja, template):
    transformers = pytest.importorskip("transformers")
    directory = write_tokenizer_dir(tmp_path / "tok", jinja)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    ours = load_tokenizer(directory)
    assert isinstance(ours, HFTokenizer)
    assert template_from_checkpoint(directory) == template
    empty_system = [{"role": "system", "content": ""}, *CONVERSATION[1:3]]
    for messages in (CONVERSATION, CONVERSATION[1:], empty_system, USER_USER, ASSISTANT_ASSISTANT, SYSTEM_ASSISTANT):
        text = reference.apply_chat_template(messages, tokenize=False)
        assert render(messages, template) == text
        expected = reference(text, add_special_tokens=False)["input_ids"]
        ids, labels = encode_chat(ours, messages, template)
        assert ids == expected
        # Labelled: each assistant message's content and <|end|> (its leading spaces absorbed by rstrip).
        answers = [ours.encode(m["content"].lstrip() + "<|end|>") for m in messages if m["role"] == "assistant"]
        assert [t for t in labels if t != IGNORE_INDEX] == sum(answers, [])
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
        prompt = reference.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert encode_prompt(ours, messages[:-1], template) == reference(prompt, add_special_tokens=False)["input_ids"]
    # rstrip: the template's newlines after role tokens and <|end|> are absorbed; only the one inside a
    # message stays (byte-fallback id of "\n" is 3 + 10).
    assert encode_chat(ours, CONVERSATION, template)[0].count(13) == 1


def test_labels_cover_assistant_turns_and_their_end_token():
    tok = ByteTokenizer()
    ids, labels = encode_chat(tok, CONVERSATION, PHI3)
    assert len(ids) == len(labels)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "2 + 3 = 5. Ünïcode ✓<|end|>What of it<|end|>"  # leading spaces absorbed by rstrip
    assert ids[-1] == tok.token_to_id("<|endoftext|>") and labels[-1] == IGNORE_INDEX
    ids, labels = encode_chat(tok, CONVERSATION, PHI3_2024_04)
    assert ids[0] == tok.token_to_id("<s>")
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == learned
    assert "You are kind" not in tok.decode(ids)  # the April template has no system role


@pytest.mark.parametrize("template", [PHI3, PHI3_5, PHI3_2024_04, PHI3_MEDIUM_2024_04], ids=lambda t: t.name)
@pytest.mark.parametrize(
    ("messages", "learned"),
    [
        (USER_USER, "A<|end|>"),
        (ASSISTANT_ASSISTANT, "A1<|end|>A2<|end|>"),
        (SYSTEM_ASSISTANT, "A0<|end|>A<|end|>"),
        ([{"role": "system", "content": "S"}, *USER_USER], "A<|end|>"),
        ([{"role": "assistant", "content": "A0"}, *ASSISTANT_ASSISTANT], "A0<|end|>A1<|end|>A2<|end|>"),
    ],
    ids=["user-user-assistant", "user-assistant-assistant", "system-assistant", "system-user-user",
         "assistant-first"],
)
def test_labels_of_consecutive_turns_of_one_role(template, messages, learned):
    tok = ByteTokenizer()
    ids, labels = encode_chat(tok, messages, template)
    absorbed = re.sub(r"(<\|(?:system|user|assistant|end)\|>)\s+", r"\1", render(messages, template))  # rstrip
    assert tok.decode(ids) == absorbed
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == learned
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


def test_april_template_labels_no_role_token_between_user_turns():
    tok = ByteTokenizer()
    ids, labels = encode_chat(tok, USER_USER, PHI3_2024_04)
    assert tok.decode(ids) == "<s><|user|>Q1<|end|><|assistant|><|user|>Q2<|end|><|assistant|>A<|end|>"
    assert tok.decode(ids[-2:]) == "A<|end|>" and set(labels[:-2]) == {IGNORE_INDEX}
    ids, labels = encode_chat(tok, ASSISTANT_ASSISTANT, PHI3_2024_04)
    assert tok.decode(ids) == "<s><|user|>Q1<|end|><|assistant|>A1<|end|>A2<|end|>"
    assert labels[-6:] == ids[-6:] and set(labels[:-6]) == {IGNORE_INDEX}


def test_labels_need_special_tokens_matched_atomically():
    class SplitsSpecialTokens(ByteTokenizer):
        def encode(self, text: str) -> list[int]:
            return list(text.encode("utf-8"))

    with pytest.raises(ValueError, match=r"gave 0 ids of template tokens for 5 in the text; it does not match"):
        encode_chat(SplitsSpecialTokens(), USER_USER[1:], PHI3)


def test_template_detection():
    assert template_from_jinja(None) == PHI3
    assert template_from_jinja(APRIL_TEMPLATE.replace("{{ bos_token }}", "")) == PHI3_MEDIUM_2024_04
    with pytest.raises(ValueError, match="not a Phi-3 template"):
        template_from_jinja("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")


def test_template_from_checkpoint_reads_chat_template_jinja_and_lists(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": APRIL_TEMPLATE}]}))
    assert template_from_checkpoint(tmp_path) == PHI3_2024_04
    (tmp_path / "chat_template.jinja").write_text(CURRENT_TEMPLATE)
    assert template_from_checkpoint(tmp_path) == PHI3


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
        ([{"role": "user", "content": 3}], "must be a string"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "user", "content": "a<|end|>b"}, {"role": "assistant", "content": "c"}], "special token <|end|>"),
    ],
)
def test_check_conversation_errors(messages, message):
    with pytest.raises(ValueError, match=f"^train.jsonl:7: .*{message}".replace("|", r"\|")):
        check_conversation(messages, "train.jsonl:7")

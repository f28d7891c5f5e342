"""Phi-3 in plain PyTorch: config, model, checkpoint loading/saving and generation, without transformers.

from lora.phi3 import from_pretrained, generate
model = from_pretrained("Phi-3-mini-4k-instruct")          # bf16, memory-mapped
out = generate(model, input_ids, max_new_tokens=64)         # stops on <|end|>, <|assistant|>, <|endoftext|>
"""

from lora.phi3.chat import ChatTemplate, encode_chat, encode_prompt, render, stop_token_ids, template_from_checkpoint
from lora.phi3.checkpoint import from_pretrained, save_pretrained
from lora.phi3.config import Phi3Config
from lora.phi3.data import collate, encode_conversations, pack_examples, read_conversations
from lora.phi3.generation import default_stop_token_ids, generate
from lora.phi3.loss import chunked_cross_entropy
from lora.phi3.merged_checkpoint import MergeVerificationError, merge_and_save
from lora.phi3.model import KVCache, Phi3ForCausalLM, Phi3Model
from lora.phi3.patch import DEFAULT_TARGETS, PatchSummary, patch
from lora.phi3.peft_format import load_peft_adapter, save_peft_adapter
from lora.phi3.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "DEFAULT_TARGETS",
    "ByteTokenizer",
    "ChatTemplate",
    "HFTokenizer",
    "KVCache",
    "MergeVerificationError",
    "PatchSummary",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Phi3Model",
    "chunked_cross_entropy",
    "collate",
    "default_stop_token_ids",
    "encode_chat",
    "encode_conversations",
    "encode_prompt",
    "from_pretrained",
    "generate",
    "load_peft_adapter",
    "load_tokenizer",
    "merge_and_save",
    "pack_examples",
    "patch",
    "read_conversations",
    "render",
    "save_peft_adapter",
    "save_pretrained",
    "stop_token_ids",
    "template_from_checkpoint",
]

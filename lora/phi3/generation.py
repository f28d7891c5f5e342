"""Autoregressive decoding for `Phi3ForCausalLM` with a KV cache: greedy (as transformers) or top-p sampling.

Batches are left-padded: `attention_mask` is 0 on the left pads, and positions count real tokens only
(`cumsum(mask) - 1`), as transformers' `generate` does, so greedy output equals transformers' token for token.
"""

from __future__ import annotations

import torch

from lora.phi3.model import KVCache, Phi3ForCausalLM, uses_long_rope

__all__ = ["default_stop_token_ids", "generate"]


def default_stop_token_ids(model: Phi3ForCausalLM) -> list[int]:
    """Stop ids from `generation_config.json`, else config.json's eos id (Phi-3: 32000, 32001, 32007)."""
    eos = model.generation_config.get("eos_token_id")
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(model: Phi3ForCausalLM, stop_ids: list[int]) -> int:
    """What finished rows are filled with: the pad id, else the first stop id (transformers' rule), else 0."""
    for pad in (model.generation_config.get("pad_token_id"), model.config.pad_token_id):
        if pad is not None:
            return pad
    return stop_ids[0] if stop_ids else 0


def _next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Argmax at temperature 0; else a sample from `softmax(logits / T)` cut to the top-p nucleus."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token once the more likely ones already cover top_p; the most likely one always stays.
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Phi3ForCausalLM,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_token_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt plus up to `max_new_tokens` new tokens, `(B, T + n)`; rows that stopped are padded.

    A row stops after emitting any of `stop_token_ids` (default: `default_stop_token_ids(model)`); decoding
    ends when all rows have stopped. LongRoPE: once the sequence passes `original_max_position_embeddings`,
    the cached prefix is recomputed with the long factors (transformers drops its cache at that point too).
    Example: `generate(model, ids, max_new_tokens=32)` decodes greedily.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with at least one token, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    b, prompt_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    if (attention_mask[:, 1:] < attention_mask[:, :-1]).any():
        raise ValueError("attention_mask has padding after a real token; generate needs left padding")
    stop_ids = default_stop_token_ids(model) if stop_token_ids is None else list(stop_token_ids)
    pad_id = _pad_id(model, stop_ids)
    stop = torch.tensor(stop_ids, dtype=input_ids.dtype, device=device)

    total = prompt_len + max_new_tokens
    tokens = input_ids.new_full((b, total), pad_id)
    tokens[:, :prompt_len] = input_ids
    mask = attention_mask.new_ones((b, total))
    mask[:, :prompt_len] = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, total); pads get 1 as in transformers
    padded = not bool(attention_mask.all())
    weight = model.model.embed_tokens.weight
    cache = KVCache(model.config, b, total, dtype=weight.dtype, device=weight.device)
    cached_long = False
    finished = torch.zeros(b, dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()
    try:
        for length in range(prompt_len, total):
            long = uses_long_rope(model.config, positions[:, length - 1])  # the newest token's position
            if long != cached_long:
                cache.length = 0  # keys were rotated with the short factors: recompute them with the long ones
            new = slice(cache.length, length)
            hidden = model.model(
                tokens[:, new],
                position_ids=positions[:, new],
                attention_mask=mask[:, :length] if padded else None,
                cache=cache,
            )
            cached_long = long
            logits = model.lm_head(hidden[:, -1]).float()  # (B, vocab)
            next_ids = _next_token(logits, temperature, top_p, generator)
            next_ids = torch.where(finished, pad_id, next_ids)
            tokens[:, length] = next_ids
            finished |= torch.isin(next_ids, stop)
            if bool(finished.all()):
                return tokens[:, : length + 1]
    finally:
        model.train(was_training)
    return tokens

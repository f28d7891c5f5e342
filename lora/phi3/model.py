"""Phi-3 decoder in plain PyTorch, numerically matching transformers' `Phi3ForCausalLM`.

Module names are transformers' (`model.layers.N.self_attn.qkv_proj`, ...), so checkpoint keys map 1:1 and
the four projections (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) are plain `nn.Linear` children,
always called as modules: a LoRA layer that subclasses `nn.Linear` can replace them in place.

    logits = lm_head(norm(x_L)),  x_{l+1} = h + mlp(post_attention_layernorm(h)),
    h = x_l + o_proj(attention(input_layernorm(x_l)))
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from lora.lowrank import KeptOutputs
from lora.phi3.config import Phi3Config
from lora.phi3.loss import IGNORE_INDEX, chunked_cross_entropy

__all__ = [
    "KVCache",
    "Phi3ForCausalLM",
    "Phi3LMHead",
    "Phi3Model",
    "Phi3RMSNorm",
    "attention_mask_for",
    "document_ids_from_positions",
    "rope_cos_sin",
    "uses_long_rope",
]


class _RMSNorm(torch.autograd.Function):
    """transformers' Phi-3 RMSNorm, `w * (x * rstd).to(x.dtype)` with `rstd = 1 / sqrt(mean(x^2) + eps)` in float32,
    saving only `x` and `rstd` (one float per row) for backward.

    Autograd on those ops would save float32 copies of `x` (two of them, each twice `x`'s bytes in bf16) and the
    rounded product: at Phi-3-mini's widths 25 MB per layer at 512 tokens, alive in each checkpointed layer's
    recomputation. The forward runs the same ops in the same order, so its bits are the same; the backward treats the
    rounding to `x.dtype` as the identity, as autograd does, in fewer passes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        dx = dweight = None
        normed = x.float() * rstd  # the normalised rows (out of place: for a float32 x, x.float() is x itself)
        if ctx.needs_input_grad[1]:
            dweight = (dy * normed.to(x.dtype)).sum(tuple(range(dy.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (dy * weight).float()  # the gradient of the normalised rows, as autograd takes it through `weight *`
            # d/dx of x * rstd(x): rstd * (g - normed * mean(g * normed))
            dot = (g * normed).mean(-1, keepdim=True)
            dx = g.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dweight, None


class Phi3RMSNorm(nn.Module):
    """RMSNorm in float32, weight applied in the input dtype: `w * (x / sqrt(mean(x^2) + eps)).to(dtype)`."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


def rope_cos_sin(
    config: Phi3Config, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables `(cos, sin)`, each `(B, T, rotary_dim)`, computed in float32 and cast to `dtype`.

    `inv_freq = 1 / (ext * theta ** (arange(0, d, 2) / d))`, `cos = cos(pos * inv_freq) * s`; for LongRoPE
    `ext` is the long factor list when `max(position_ids) + 1 > original_max_position_embeddings` (for
    the whole batch, as transformers does) and the short one otherwise, and `s` is
    `config.rope_attention_scaling`.
    """
    dim = config.rotary_dim
    device = position_ids.device
    inv_freq = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    if config.rope_type == "longrope":
        factors = config.long_factor if uses_long_rope(config, position_ids) else config.short_factor
        inv_freq = torch.tensor(factors, dtype=torch.float32, device=device) * inv_freq
    inv_freq = 1.0 / inv_freq
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
    scale = config.rope_attention_scaling
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def uses_long_rope(config: Phi3Config, position_ids: torch.Tensor) -> bool:
    """True when LongRoPE's long factors apply: `max(position_ids) + 1 > original_max_position_embeddings`."""
    if config.rope_type != "longrope":
        return False
    return int(position_ids.max()) + 1 > config.original_max_position_embeddings


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels (NeoX "rotate_half" layout); pass the rest through."""
    dim = cos.shape[-1]
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    x1, x2 = x_rot[..., : dim // 2], x_rot[..., dim // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def attention_mask_for(
    *,
    q_len: int,
    kv_len: int,
    sliding_window: int | None,
    padding_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask `(B or 1, 1, q_len, kv_len)`, True where a query may attend; None if plain causal.

    Queries are the last `q_len` of `kv_len` slots. Key slot j is visible to query slot i iff `j <= i`,
    `i - j < sliding_window` (when set), `padding_mask[b, j]` is 1, and both lie in the same document
    (`document_ids[b, i] == document_ids[b, j]`, queries only: packing is a training-time, cache-free case).
    Slots, not position ids, measure the window, as in transformers.
    """
    offset = kv_len - q_len
    window_bites = sliding_window is not None and kv_len > sliding_window
    if padding_mask is None and document_ids is None and not window_bites and (q_len == 1 or offset == 0):
        return None
    q = torch.arange(offset, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    allowed = k <= q
    if window_bites:
        allowed = allowed & (q - k < sliding_window)
    allowed = allowed[None, None]  # (1, 1, q_len, kv_len)
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    # A query that sees no key (a left-pad slot) would give NaN in some SDPA kernels, and NaN values would
    # then leak through zero attention weights; let it see everything: its output is never used.
    return allowed | ~allowed.any(-1, keepdim=True)


def document_ids_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the packed document of each token: a new one starts wherever `pos[t] != pos[t-1] + 1`.

    Example: positions `[0, 1, 2, 0, 1, 0]` give `[0, 0, 0, 1, 1, 2]` (transformers' rule for packing).
    """
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


class KVCache:
    """Keys and values of every layer, preallocated as `(B, n_kv_heads, max_len, head_dim)`.

    `length` slots are filled; layer i writes its new keys at `[length, length + T)`, and the model
    advances `length` once all layers have run.
    """

    def __init__(
        self, config: Phi3Config, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k, v` `(B, n_kv, T, hd)` after the filled slots; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Phi3Attention(nn.Module):
    """Grouped-query attention with a fused `qkv_proj` (rows q | k | v) and RoPE, through SDPA."""

    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_key_value_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_key_value_heads * self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (nh + 2 nkv) * hd)
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rotary_dim): broadcast over heads
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            is_causal=mask is None and t > 1,
            scale=self.head_dim**-0.5,
            enable_gqa=self.num_heads != self.num_key_value_heads,
        )  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, q_size))


class Phi3MLP(nn.Module):
    """SwiGLU with a fused `gate_up_proj` (rows: gate, then up): `down_proj(up * silu(gate))`."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # each (B, T, intermediate)
        return self.down_proj(up * F.silu(gate))


def _dropout(p: float) -> nn.Module:
    # Identity at p == 0 (all Phi-3 releases): no dropout copy on the hot path.
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Phi3DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + o_proj(attn(norm1(x)))`, `out = h + mlp(norm2(h))`."""

    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.resid_attn_dropout = _dropout(config.resid_pdrop)
        self.resid_mlp_dropout = _dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.resid_attn_dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache))
        return x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


CHECKPOINT_KEEPABLE = ("qkv_proj", "o_proj", "gate_up_proj")


def checked_checkpoint_keep(names: tuple[str, ...] | list[str] | None,
                            what: str = "checkpoint_keep") -> tuple[str, ...]:
    """`names` without repeats (None: none) if each is in `CHECKPOINT_KEEPABLE`; else an error naming `what` and the
    culprits."""
    if names is None:
        return ()
    if isinstance(names, str):
        raise TypeError(f"{what} takes a sequence of projection names, got the string {names!r}")
    unknown = [n for n in names if n not in CHECKPOINT_KEEPABLE]
    if unknown:
        raise ValueError(f"{what}: {unknown} not among {list(CHECKPOINT_KEEPABLE)}"
                         + (" (the recomputation never reaches down_proj's frozen GEMM: nothing to keep)"
                            if "down_proj" in unknown else ""))
    return tuple(dict.fromkeys(names))


class Phi3Model(nn.Module):
    """Embedding, decoder layers and final norm; returns the final hidden states `(B, T, hidden)`."""

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        # Passing the weight skips nn.Embedding's init: normal_ on the meta device (from_pretrained) first
        # imports torch._dynamo, ~2 s; a real weight is initialised right after.
        weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx, _weight=weight)
        if not weight.is_meta:
            self.embed_tokens.reset_parameters()
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self._checkpoint_keep: tuple[str, ...] = ()

    @property
    def checkpoint_keep(self) -> tuple[str, ...]:
        """Selective recomputation: the projections whose outputs a checkpointed layer keeps, so that its
        recomputation in backward skips their frozen GEMMs (`lora` layers only; see `lora.lowrank.KeptOutputs`).

        Any of `"qkv_proj"`, `"o_proj"`, `"gate_up_proj"`; each costs its output's size per layer until that layer's
        backward (in bf16: 2 bytes x 9216, 3072 and 16384 per token at Phi-3-mini's widths). `down_proj` is not
        offered: the recomputation stops before its frozen GEMM anyway. Default `()` (or None): every layer
        recomputed whole.
        """
        return self._checkpoint_keep

    @checkpoint_keep.setter
    def checkpoint_keep(self, names: tuple[str, ...] | list[str] | None) -> None:
        self._checkpoint_keep = checked_checkpoint_keep(names)

    def _checkpointed(self, layer: Phi3DecoderLayer, *args: Any) -> torch.Tensor:
        # A KeptOutputs even with nothing kept: it hands the recomputation the LoRA layers' rank-sized products
        # (drop(x) A^T, DoRA's norms), so that it redoes neither them nor the dropout's bookkeeping. Dynamo traces
        # checkpoint only without a context_fn: under torch.compile the default recomputes those products, and
        # kept outputs run the layer eagerly, outside the graph (a graph break per layer, not a tracing error).
        if not self._checkpoint_keep and torch.compiler.is_compiling():
            return checkpoint(layer, *args, use_reentrant=False)
        owners = {"qkv_proj": layer.self_attn, "o_proj": layer.self_attn, "gate_up_proj": layer.mlp}
        modules = [getattr(owners[name], name) for name in self._checkpoint_keep]
        run = torch.compiler.disable(checkpoint) if torch.compiler.is_compiling() else checkpoint
        return run(layer, *args, use_reentrant=False, context_fn=lambda: KeptOutputs(modules).contexts())

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states; see `Phi3ForCausalLM.forward` for the arguments."""
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]  # (1, T)
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask must have shape (batch, past + new tokens) = {(b, past + t)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if document_ids is not None:
            if cache is not None:
                raise ValueError("document_ids (packed rows) are for training-style full sequences, not with a "
                                 "KV cache")
            if document_ids.shape != (b, t):
                raise ValueError(f"document_ids must have the shape of input_ids {(b, t)}, "
                                 f"got {tuple(document_ids.shape)}")
        x = self.embed_tokens(input_ids)
        mask = attention_mask_for(
            q_len=t,
            kv_len=past + t,
            sliding_window=self.config.sliding_window,
            padding_mask=attention_mask,
            document_ids=document_ids,
            device=x.device,
        )
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer in self.layers:
            if checkpointed:
                x = self._checkpointed(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += t
        return self.norm(x)


class Phi3LMHead(nn.Linear):
    """The output head, `logits = h @ W.T` (an `nn.Linear`, key `lm_head.weight`); `loss` is the chunked
    cross-entropy through it, a method of the head so that FSDP2 gathers the head for the loss alone
    (`lora.phi3.fsdp` registers it as a forward method)."""

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, *, chunk_size: int, reduction: str
    ) -> torch.Tensor:
        """`chunked_cross_entropy(hidden, self.weight, targets)`; `hidden` `(N, H)`, `targets` `(N,)`."""
        return chunked_cross_entropy(hidden, self.weight, targets, chunk_size=chunk_size, reduction=reduction)


class Phi3ForCausalLM(nn.Module):
    """Phi-3 language model: `logits = lm_head(Phi3Model(input_ids))`, keys as in the Hub checkpoints.

    `name_or_path` (the directory it was loaded from) and `generation_config` (the parsed
    `generation_config.json`, a dict) are set by `from_pretrained`.
    Example: `Phi3ForCausalLM(Phi3Config(num_hidden_layers=2))(ids).shape == (B, T, 32064)`.
    """

    # Tokens per chunk of the chunked loss. A chunk holds its float32 logits and their bf16 gradient, 6 bytes
    # x 32064 per token (49 MB at 256), on top of the step's other memory; what a chunk costs beyond its
    # FLOPs is a fixed repacking of the head's weight for its two GEMMs.
    loss_chunk_size: int = 256

    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
        self.lm_head = Phi3LMHead(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.name_or_path: str | None = None
        self.generation_config: dict[str, Any] = {}

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each decoder layer in backward (non-reentrant `torch.utils.checkpoint`) when True."""
        return self.model.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.model.gradient_checkpointing = enabled

    @property
    def checkpoint_keep(self) -> tuple[str, ...]:
        """With `gradient_checkpointing`: the projections whose outputs each layer keeps (see `Phi3Model`)."""
        return self.model.checkpoint_keep

    @checkpoint_keep.setter
    def checkpoint_keep(self, names: tuple[str, ...] | list[str] | None) -> None:
        self.model.checkpoint_keep = names

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits `(B, T, vocab)` for `input_ids` `(B, T)`; with `labels`, the loss instead (see `loss`).

        `model(ids, labels)` is what DDP wraps and FSDP2 hooks (their machinery runs on `forward`), as
        nanoGPT's `model(x, targets)` and transformers' `model(input_ids, labels=...)`.

        `position_ids` `(B or 1, T)` default to `past + arange(T)`. `attention_mask` `(B, past + T)` has 1
        for real tokens and 0 for padding (right padding; left padding with matching position_ids, as
        `generate` builds them). `document_ids` `(B, T)` block attention between documents packed into one
        row: a token attends only to earlier tokens of its own document (`collate` gives them for packed rows;
        `document_ids_from_positions` derives them where `position_ids` restart, transformers' implicit rule
        for position_ids without an attention_mask and without a cache; here it is asked for, so a plain call
        never changes the mask).
        `cache` is the `KVCache` that `generate` threads through.
        """
        if labels is not None:
            if cache is not None:
                raise ValueError("labels (a loss) and a KV cache (generation) do not go together")
            return self.loss(input_ids, labels, position_ids=position_ids, attention_mask=attention_mask,
                             document_ids=document_ids, reduction=reduction)
        hidden = self.model(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, document_ids=document_ids, cache=cache
        )
        return self.lm_head(hidden)

    def loss(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Next-token cross-entropy: token t predicts `labels[t + 1]`; labels of -100 are ignored.

        `reduction="mean"` averages over the counted labels (0 when there are none), `"sum"` adds them up
        (for gradient accumulation over a known token count). The lm_head and the loss run over chunks
        of `loss_chunk_size` tokens, so full float32 logits never exist (see `chunked_cross_entropy`).
        """
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
            )
        hidden = self.model(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, document_ids=document_ids
        )
        targets = labels[:, 1:].reshape(-1)  # (B * (T - 1),)
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B * (T - 1), hidden)
        keep = targets != IGNORE_INDEX
        return self.lm_head.loss(
            hidden[keep], targets[keep], chunk_size=self.loss_chunk_size, reduction=reduction
        )

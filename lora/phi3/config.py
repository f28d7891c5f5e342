"""`Phi3Config`: the hyper-parameters of a Phi-3 checkpoint, read from its `config.json`.

Two spellings of the same file exist in the wild and both are accepted:

- transformers 4 (the Hub's Phi-3 files): `rope_theta`, `rope_scaling={"type": "su" | "longrope" | "yarn",
  "short_factor", "long_factor"}` and `torch_dtype`;
- transformers 5 (what `save_pretrained` writes today): `rope_parameters={"rope_type", "rope_theta",
  "partial_rotary_factor", ...}` and `dtype`.

`su`, `longrope` and the legacy `yarn` of old Phi-3 configs are one algorithm (LongRoPE) and are stored
as `rope_type="longrope"`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Phi3Config", "architecture", "read_json"]

# Names under which Phi-3 configs spell LongRoPE: "su" (April 2024 Hub files), "yarn" (older remote code).
_LONGROPE_NAMES = ("su", "longrope", "yarn")


def read_json(path: Path) -> Any:
    """`json.loads` of a checkpoint's JSON file; a malformed one is a ValueError naming it."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


@dataclass
class Phi3Config:
    """Hyper-parameters of a Phi-3 model; field names and defaults follow `config.json` (Phi-3-mini-4k).

    Example: `Phi3Config.from_json("Phi-3-mini-4k-instruct/config.json").head_dim == 96`.
    """

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: Literal["default", "longrope"] = "default"
    partial_rotary_factor: float = 1.0
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None
    rope_factor: float | None = None
    attention_factor: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_types()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._validate()

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates: `int(head_dim * partial_rotary_factor)`."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_attention_scaling(self) -> float:
        """LongRoPE's factor on cos and sin: `sqrt(1 + ln(f) / ln(original_max))`, f = max / original_max.

        An explicit `attention_factor` or `factor` in the config wins; 1.0 for default RoPE.
        Example: 131072 / 4096 gives 1.1902380714.
        """
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        factor = self.rope_factor
        if factor is None:
            factor = self.max_position_embeddings / self.original_max_position_embeddings
        if factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(factor) / math.log(self.original_max_position_embeddings))

    @classmethod
    def from_json(cls, path: str | Path) -> Phi3Config:
        """Read a `config.json` (transformers 4 or 5 spelling); errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found; expected a Hugging Face checkpoint directory")
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Phi3Config:
        """Build from a parsed `config.json`; keys this model does not use are kept in `extra`."""
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type != "phi3":
            raise ValueError(f"model_type is {model_type!r}, expected 'phi3'")
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None) or {}
        data.pop("rope_scaling", None)
        rope = dict(rope)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if rope_type in _LONGROPE_NAMES:
            rope_type = "longrope"
        elif rope_type != "default":
            raise ValueError(
                f"rope type {rope_type!r} is not supported; expected 'default' or one of {_LONGROPE_NAMES}"
            )
        kwargs: dict[str, Any] = {"rope_type": rope_type}
        # The v5 spelling nests these in rope_parameters; the v4 one keeps them at the top level.
        for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
            value = rope.pop(key, None)
            top = data.pop(key, None)
            if value is None:
                value = top
            if value is not None:
                kwargs[key] = value
        kwargs["short_factor"] = rope.pop("short_factor", None)
        kwargs["long_factor"] = rope.pop("long_factor", None)
        kwargs["rope_factor"] = rope.pop("factor", None)
        kwargs["attention_factor"] = rope.pop("attention_factor", None)
        kwargs["dtype"] = data.pop("dtype", None) or data.pop("torch_dtype", None)
        data.pop("torch_dtype", None)
        names = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs.update({k: data.pop(k) for k in list(data) if k in names})
        kwargs["extra"] = {**data, **({"rope_parameters": rope} if rope else {})}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The transformers-5 spelling of `config.json` (what transformers' `from_pretrained` reads)."""
        rope: dict[str, Any] = {
            "rope_type": self.rope_type,
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        if self.rope_type == "longrope":
            rope.update(
                short_factor=self.short_factor,
                long_factor=self.long_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
            if self.rope_factor is not None:
                rope["factor"] = self.rope_factor
            if self.attention_factor is not None:
                rope["attention_factor"] = self.attention_factor
        out = {k: v for k, v in self.extra.items() if k != "rope_parameters"}
        out.update(
            architectures=["Phi3ForCausalLM"],
            model_type="phi3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            original_max_position_embeddings=self.original_max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            partial_rotary_factor=self.partial_rotary_factor,
            sliding_window=self.sliding_window,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_dropout=self.attention_dropout,
            resid_pdrop=self.resid_pdrop,
            embd_pdrop=self.embd_pdrop,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=self.dtype,
        )
        # Only write head_dim when it is not the implied one: transformers' Phi3Config has no such field.
        if self.head_dim != self.hidden_size // self.num_attention_heads:
            out["head_dim"] = self.head_dim
        return out

    def _check_types(self) -> None:
        """Each field of its type and range (a bool is not an int, a string not a number): a ValueError naming it."""
        def fail(name: str, expected: str) -> None:
            value = getattr(self, name)
            raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")

        def is_int(value: Any) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "original_max_position_embeddings", "num_key_value_heads",
                     "head_dim", "sliding_window"):
            value = getattr(self, name)
            optional = name in ("num_key_value_heads", "head_dim", "sliding_window")
            if not (optional and value is None) and not (is_int(value) and value > 0):
                fail(name, "a positive integer" + (" or null" if optional else ""))
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "attention_factor"):
            value = getattr(self, name)
            if not (name in ("rope_factor", "attention_factor") and value is None) and not (
                    is_number(value) and value > 0):
                fail(name, "a positive number")
        if not (is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            fail("partial_rotary_factor", "a number in (0, 1]")
        for name in ("attention_dropout", "resid_pdrop", "embd_pdrop"):
            if not (is_number(getattr(self, name)) and 0 <= getattr(self, name) < 1):
                fail(name, "a number in [0, 1)")
        if not isinstance(self.tie_word_embeddings, bool):
            fail("tie_word_embeddings", "true or false")
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
            if value is not None and not all(is_int(i) and i >= 0 for i in ids):
                fail(name, "a token id (an integer >= 0)" + (", a list of them" if name == "eos_token_id" else "")
                     + " or null")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(is_number(v) for v in value)):
                fail(name, "a list of numbers or null")
        if self.dtype is not None and not isinstance(self.dtype, str):
            fail("dtype", "a dtype name such as \"bfloat16\"")

    def _validate(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; Phi-3 uses 'silu'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be null or a positive int, got {self.sliding_window}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) x partial_rotary_factor ({self.partial_rotary_factor}) "
                             f"must give an even number of rotary channels >= 2, got {self.rotary_dim}")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(self, name)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    got = None if factors is None else len(factors)
                    raise ValueError(
                        f"LongRoPE {name} must be a list of rotary_dim/2 = {self.rotary_dim // 2} numbers, got {got}"
                    )


def architecture(config: Phi3Config | Any) -> dict[str, Any]:
    """The fields of a Phi-3 config as `Phi3Config` normalises them (one RoPE spelling, `head_dim` and
    `num_key_value_heads` filled in): the `architecture` an adapter fingerprint compares (`lora.save_adapter`).

    `config`: ours, transformers' `Phi3Config` or a parsed `config.json`.
    Example: `lora.save_adapter(hf_model, path, architecture=architecture(hf_model.config))`.
    """
    if not isinstance(config, Phi3Config):
        config = Phi3Config.from_dict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    fields = dataclasses.asdict(config)
    del fields["extra"]
    return fields

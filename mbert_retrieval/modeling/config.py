"""ModernBERT configuration: reads and writes the Hugging Face `config.json`.

Both spellings found in the wild are accepted:
- original: `global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`;
- transformers 5: `layer_types` (a list of "full_attention" / "sliding_attention") and
  `rope_parameters` ({"full_attention": {"rope_theta": ...}, "sliding_attention": {...}}).
We write both, so the saved folder loads in old and new `transformers` alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

GLOBAL = "full_attention"
LOCAL = "sliding_attention"


class ConfigError(ValueError):
    """A config.json that does not describe a ModernBERT model we can build."""


@dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    layer_types: list[str] = field(default_factory=list)
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    local_attention: int = 128
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_bias: bool = False
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    pad_token_id: int = 50283
    bos_token_id: int = 50281
    eos_token_id: int = 50282
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    tie_word_embeddings: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.num_hidden_layers, 3)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window_half(self) -> int:
        """Tokens each side that a local layer sees (64 for the 128-token window)."""
        return self.local_attention // 2

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == GLOBAL

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {GLOBAL, LOCAL}
        if unknown:
            raise ConfigError(f"layer_types may hold only {GLOBAL!r} and {LOCAL!r}, not {sorted(unknown)}")
        for name in ("hidden_activation", "classifier_activation"):
            if getattr(self, name) not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu"):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModernBertConfig:
        raw = dict(raw)
        model_type = raw.get("model_type", "modernbert")
        if model_type != "modernbert":
            raise ConfigError(f"config.json has model_type={model_type!r}; expected 'modernbert'")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: raw.pop(k) for k in list(raw) if k in known}
        values.update(_read_rope_spellings(raw, values))
        if not values.get("layer_types"):
            every = raw.pop("global_attn_every_n_layers", 3)
            values["layer_types"] = default_layer_types(values.get("num_hidden_layers", 22), every)
        for key in ("eos_token_id",):  # transformers allows a list here
            if isinstance(values.get(key), list):
                values[key] = values[key][0]
        return cls(**values, extra=raw)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModernBertConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(raw)

    def to_dict(self, architectures: list[str] | None = None) -> dict[str, Any]:
        out = {k: v for k, v in self.extra.items() if k not in ("rope_scaling", "architectures")}
        out.update({k: v for k, v in asdict(self).items() if k != "extra"})
        out["model_type"] = "modernbert"
        if architectures:
            out["architectures"] = architectures
        out["global_attn_every_n_layers"] = self._global_every()
        out["rope_parameters"] = {
            GLOBAL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
            LOCAL: {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        return out

    def _global_every(self) -> int:
        """The original spelling's period, when the layer pattern has one (else 1 for all-global)."""
        for every in range(1, self.num_hidden_layers + 1):
            if self.layer_types == default_layer_types(self.num_hidden_layers, every):
                return every
        return 1

    def save(self, path: str | Path, architectures: list[str] | None = None) -> None:
        from mbert_retrieval.modeling.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(architectures), indent=2, sort_keys=True))


def default_layer_types(num_layers: int, global_every: int) -> list[str]:
    return [GLOBAL if i % global_every == 0 else LOCAL for i in range(num_layers)]


def _read_rope_spellings(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Pull the two RoPE thetas out of whichever spelling the file uses."""
    thetas: dict[str, Any] = {}
    rope = raw.pop("rope_parameters", None) or {}
    if GLOBAL in rope and "rope_theta" in (rope[GLOBAL] or {}):
        thetas["global_rope_theta"] = rope[GLOBAL]["rope_theta"]
    if LOCAL in rope and "rope_theta" in (rope[LOCAL] or {}):
        thetas["local_rope_theta"] = rope[LOCAL]["rope_theta"]
    for name in ("global_rope_theta", "local_rope_theta"):
        if name in values:
            thetas.setdefault(name, values[name])
    scaling = raw.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope_scaling={scaling!r} is not supported; only default RoPE is")
    return thetas

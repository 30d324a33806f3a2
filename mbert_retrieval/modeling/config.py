"""ModernBERT configuration: reads and writes the Hugging Face `config.json`.

Both spellings found in the wild are accepted:
- original: `global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`;
- transformers 5: `layer_types` (a list of "full_attention" / "sliding_attention") and
  `rope_parameters` ({"full_attention": {"rope_theta": ...}, "sliding_attention": {...}}).
We write both, so the saved folder loads in old and new `transformers` alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mbert_retrieval.files import atomic_write_text, read_json

GLOBAL = "full_attention"
LOCAL = "sliding_attention"
SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "local_attention",
)
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")
FLAGS = ("norm_bias", "attention_bias", "mlp_bias", "decoder_bias", "classifier_bias", "tie_word_embeddings")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu")


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
        self._check_sizes()
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
        """Raise ConfigError naming the first setting no model can be built (or run sensibly) with."""
        self._check_sizes()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(
                f"hidden_size / num_attention_heads = {self.head_dim} must be even (rotary embeddings "
                f"rotate pairs of dimensions)"
            )
        if self.local_attention % 2:
            raise ConfigError(
                f"local_attention must be even (a window of local_attention / 2 tokens each side), "
                f"not {self.local_attention}"
            )
        for name in ("global_rope_theta", "local_rope_theta"):
            if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number, not {getattr(self, name)!r}")
        if not is_number(self.norm_eps) or self.norm_eps < 0:
            raise ConfigError(f"norm_eps must be a number >= 0, not {self.norm_eps!r}")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        for name in TOKEN_IDS:
            value = getattr(self, name)
            if value is not None and (not is_integer(value) or value < 0):
                raise ConfigError(f"{name} must be a token id (an integer >= 0), not {value!r}")
        if self.pad_token_id is not None and self.pad_token_id >= self.vocab_size:
            raise ConfigError(
                f"pad_token_id ({self.pad_token_id}) is outside the vocabulary (vocab_size {self.vocab_size})"
            )
        self._check_layer_types()
        for name in ("hidden_activation", "classifier_activation"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in ACTIVATIONS:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported")

    def _check_sizes(self) -> None:
        for name in SIZES:
            value = getattr(self, name)
            if not is_integer(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")

    def _check_layer_types(self) -> None:
        if not isinstance(self.layer_types, list):
            raise ConfigError(f"layer_types must be a list, not {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = {repr(t) for t in self.layer_types} - {repr(GLOBAL), repr(LOCAL)}
        if unknown:
            raise ConfigError(
                f"layer_types may hold only {GLOBAL!r} and {LOCAL!r}, not {', '.join(sorted(unknown))}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModernBertConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a JSON object of settings, not a {type(raw).__name__}")
        raw = dict(raw)
        model_type = raw.get("model_type", "modernbert")
        if model_type != "modernbert":
            raise ConfigError(f"model_type={model_type!r}; expected 'modernbert'")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: raw.pop(k) for k in list(raw) if k in known}
        values.update(_read_rope_spellings(raw, values))
        if not values.get("layer_types"):
            every = raw.pop("global_attn_every_n_layers", 3)
            if not is_integer(every) or every <= 0:
                raise ConfigError(f"global_attn_every_n_layers must be a positive integer, not {every!r}")
            layers = values.get("num_hidden_layers", 22)
            if not is_integer(layers) or layers <= 0:
                raise ConfigError(f"num_hidden_layers must be a positive integer, not {layers!r}")
            values["layer_types"] = default_layer_types(layers, every)
        for key in ("eos_token_id",):  # transformers allows a list here
            if isinstance(values.get(key), list):
                values[key] = values[key][0] if values[key] else None
        return cls(**values, extra=raw)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModernBertConfig:
        """Read a config.json; every problem is a ConfigError that names the file."""
        path = Path(path)
        raw = read_json(path, ConfigError, expect=object)  # from_dict names what is wrong with it
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

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
        atomic_write_text(Path(path), json.dumps(self.to_dict(architectures), indent=2, sort_keys=True))


def default_layer_types(num_layers: int, global_every: int) -> list[str]:
    return [GLOBAL if i % global_every == 0 else LOCAL for i in range(num_layers)]


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (JSON lets NaN and Infinity through; booleans are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_rope_spellings(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Pull the two RoPE thetas out of whichever spelling the file uses."""
    thetas: dict[str, Any] = {}
    rope = raw.pop("rope_parameters", None) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be an object, not {rope!r}")
    for layer_type, name in ((GLOBAL, "global_rope_theta"), (LOCAL, "local_rope_theta")):
        entry = rope.get(layer_type) or {}
        if not isinstance(entry, dict):
            raise ConfigError(f"rope_parameters[{layer_type!r}] must be an object, not {entry!r}")
        if "rope_theta" in entry:
            thetas[name] = entry["rope_theta"]
    for name in ("global_rope_theta", "local_rope_theta"):
        if name in values:
            thetas.setdefault(name, values[name])
    if "local_rope_theta" in thetas and thetas["local_rope_theta"] is None:
        # transformers' reading of null: the local layers use the global theta
        thetas["local_rope_theta"] = thetas.get("global_rope_theta", ModernBertConfig.global_rope_theta)
    scaling = raw.get("rope_scaling")
    if scaling and not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, not {scaling!r}")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"rope_scaling={scaling!r} is not supported; only default RoPE is")
    return thetas

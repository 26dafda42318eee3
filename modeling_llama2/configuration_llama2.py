"""Llama 2 configuration.

The keyword names are those of transformers' `LlamaConfig`, so a Llama 2 `config.json` from the Hub loads
as it is; the defaults are Llama 2 7B's (4096 positions, RMSNorm eps 1e-5), not `LlamaConfig`'s.
"""

import math
import os
import shutil

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

# Where a saved checkpoint finds its classes when loaded with `trust_remote_code=True`. Every module named
# here, and every module it imports relatively, is copied beside the weights by `save_pretrained`.
AUTO_MAP = {
    "AutoConfig": "configuration_llama2.Llama2Config",
    "AutoModel": "modeling_llama2.Llama2Model",
    "AutoModelForCausalLM": "modeling_llama2.Llama2ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_llama2.Llama2ForSequenceClassification",
}

# The two ways a checkpoint can be written. `llama` is transformers' stock Llama (`LlamaForCausalLM` in
# `architectures`, no custom code), which every Llama tool reads; `llama2` is this package's own type, with `auto_map`
# and the source files beside the weights, so `AutoModelForCausalLM` gives this package's model.
STOCK_MODEL_TYPE = "llama"
MODEL_TYPES = (STOCK_MODEL_TYPE, "llama2")
STOCK_ARCHITECTURES = {
    "Llama2Model": "LlamaModel",
    "Llama2ForCausalLM": "LlamaForCausalLM",
    "Llama2ForSequenceClassification": "LlamaForSequenceClassification",
}

# RoPE types the rotary embedding understands: the original one plus every scaling transformers implements
# (`linear` position interpolation, `dynamic` NTK, `llama3`, `yarn`, ...).
ROPE_TYPES = ("default", *ROPE_INIT_FUNCTIONS)


def _is_real(value: object) -> bool:
    """An int or float, not a bool: JSON `true` is no RoPE factor."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@strict
class Llama2Config(PreTrainedConfig):
    r"""Configuration of a Llama 2 model (defaults: Llama-2-7b).

    Attention is multi-head when `num_key_value_heads == num_attention_heads`, grouped-query (GQA, Llama 2
    34B/70B) when it divides it, and multi-query when it is 1. RoPE settings live in `rope_parameters`
    (`rope_type`, `rope_theta`, scaling keys); the legacy `rope_theta=` and `rope_scaling=` keywords are
    accepted and folded into it.
    """

    model_type = "llama2"
    # Tensor- and pipeline-parallel plans, as transformers declares them for Llama.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    auto_map: dict | None = None
    # Which `model_type` `save_pretrained` writes (see MODEL_TYPES); a config read from a stock Llama folder keeps
    # `llama`, so a fine-tuned Hub Llama is saved as a Hub Llama. Not itself written to `config.json`.
    checkpoint_format: str = "llama2"

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.auto_map is None:
            self.auto_map = dict(AUTO_MAP)
        super().__post_init__(**kwargs)
        if self.checkpoint_format not in MODEL_TYPES:
            raise ValueError(
                f"`checkpoint_format` must be one of {', '.join(MODEL_TYPES)}, got {self.checkpoint_format!r}."
            )
        self._check_shapes()
        self._check_rope()

    def _check_shapes(self) -> None:
        for name in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "vocab_size", "max_position_embeddings",
        ):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads}): each key/value head serves a whole group of query heads "
                "(1 for multi-query, equal for multi-head attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` ({self.head_dim}) must be even: RoPE rotates pairs of dimensions.")
        # NaN fails every comparison, so `not eps > 0` also refuses it.
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(
                f"`rms_norm_eps` must be a positive finite number (Llama 2: 1e-5), got {self.rms_norm_eps}."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"`hidden_act` is {self.hidden_act!r}, which transformers does not know; use one of "
                f"{', '.join(sorted(ACT2FN))} (Llama 2: silu)."
            )
        # transformers only warns here, for old Hub configs with `pad_token_id=-1`; an id outside the embedding
        # table fails later, at the first forward, far from its cause.
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` must be a token id in [0, {self.vocab_size}) (`vocab_size` {self.vocab_size}), "
                f"or null (Llama 2 has no pad token), got {self.pad_token_id}."
            )

    def _check_rope(self) -> None:
        rope = self.rope_parameters
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"`rope_parameters['rope_type']` (or `rope_scaling['type']`) is {rope_type!r}, which is not a known "
                f"RoPE type; use one of {', '.join(ROPE_TYPES)}."
            )
        theta = rope.get("rope_theta", 10000.0)
        if not _is_real(theta) or not (theta > 0 and math.isfinite(theta)):
            raise ValueError(f"`rope_theta` must be a positive finite number (Llama 2: 10000.0), got {theta!r}.")
        if rope_type != "default":
            factor = rope.get("factor")
            if not _is_real(factor) or not (factor >= 1 and math.isfinite(factor)):
                raise ValueError(
                    f"`rope_parameters['factor']` must be a finite number >= 1 for RoPE type {rope_type!r} "
                    f"(how many times the trained context is stretched), got {factor!r}."
                )

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> tuple[dict, dict]:
        """Read a stock Llama `config.json` as this config (quietly: the weights are the same), remembering to
        write it back as one, and refuse other model types (Mistral's sliding window, say, would be dropped)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type not in MODEL_TYPES:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} model; Llama2Config reads Llama checkpoints "
                f"(model_type {' or '.join(map(repr, MODEL_TYPES))}) only."
            )
        return {**config_dict, "model_type": cls.model_type, "checkpoint_format": model_type}, kwargs

    def to_dict(self) -> dict:
        """As `config.json` holds it: for the stock format, transformers' Llama type and class names, no `auto_map`,
        and `rope_theta` also at the top level, where readers older than `rope_parameters` look for it."""
        output = super().to_dict()
        output.pop("checkpoint_format", None)
        if self.checkpoint_format == STOCK_MODEL_TYPE:
            output["model_type"] = STOCK_MODEL_TYPE
            output.pop("auto_map", None)
            if output.get("architectures"):
                output["architectures"] = [STOCK_ARCHITECTURES.get(name, name) for name in output["architectures"]]
            output["rope_theta"] = self.rope_parameters["rope_theta"]
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save `config.json` and, for this package's own format, the source files `auto_map` names, so the folder
        loads with `trust_remote_code=True` where this package is not installed."""
        super().save_pretrained(save_directory, **kwargs)
        if self.checkpoint_format != STOCK_MODEL_TYPE:
            for path in remote_code_files():
                shutil.copyfile(path, os.path.join(save_directory, os.path.basename(path)))


def remote_code_files() -> list[str]:
    """The source files `AUTO_MAP` names, found beside this one, and those they import relatively.

    Run as remote code, this module sits in transformers' module cache, which holds only the modules loaded so far
    (a config loaded alone has no modeling file beside it): those missing are skipped, and a model's
    `save_pretrained` copies its own (transformers' `custom_object_save`, for remote-code models).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    modules = {os.path.join(here, reference.split(".")[0] + ".py") for reference in AUTO_MAP.values()}
    files = {module for module in modules if os.path.exists(module)}
    for module in sorted(files):
        files.update(get_relative_import_files(module))
    return sorted(files)

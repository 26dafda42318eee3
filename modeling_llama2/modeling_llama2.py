"""Llama 2 (Touvron et al., 2023): a pre-norm decoder with RMSNorm, SwiGLU, rotary embeddings and grouped-query
attention.

Parameter names and layouts are those of transformers' Llama (q/k projections in the rotate-half layout), so
Hub checkpoints, PEFT targets, device maps and tensor-parallel plans apply unchanged. This file and the ones it
imports relatively (`configuration_llama2.py`, `loss_llama2.py`) are copied beside saved weights for
`trust_remote_code=True`: they import only torch, transformers and each other.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_llama2 import Llama2Config
from .loss_llama2 import causal_lm_head_loss, causal_lm_loss


def context_length(config: Llama2Config) -> int | None:
    """The longest sequence (prompt plus generated tokens) the model is fit to attend over: `max_position_embeddings`,
    times the RoPE scaling's `factor` when one stretches it; None under `dynamic` NTK scaling, which recomputes its
    frequencies for any length. For `yarn`/`llama3` configs whose `max_position_embeddings` already counts the
    stretch, `factor` x it is generous: the bound is there to catch mistakes, never to refuse a valid request."""
    rope = config.rope_parameters
    if rope["rope_type"] == "default":
        return config.max_position_embeddings
    if rope["rope_type"] == "dynamic":
        return None
    return int(rope["factor"] * config.max_position_embeddings)


def check_generation_length(config: Llama2Config, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a generation request whose prompt plus `max_new_tokens` cannot fit `context_length(config)`: past it,
    unscaled RoPE continues with fluent-looking garbage rather than an error."""
    limit = context_length(config)
    if limit is None or prompt_length + max_new_tokens <= limit:
        return
    fix = f"ask for at most {limit - prompt_length} new tokens" if prompt_length < limit else "shorten the prompt"
    raise ValueError(
        f"A prompt of {prompt_length} tokens plus {max_new_tokens} new tokens does not fit the model's context of "
        f"{limit} tokens (`max_position_embeddings` {config.max_position_embeddings}, RoPE type "
        f"{config.rope_parameters['rope_type']!r}): {fix}, or set a RoPE scaling "
        "(e.g. `rope_parameters={'rope_type': 'dynamic', 'factor': 2.0}`) to stretch the context."
    )


class Llama2RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activations' dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class Llama2RotaryEmbedding(nn.Module):
    """cos/sin tables of RoPE for given positions. Scaled variants (`linear`, `dynamic` NTK, `llama3`, `yarn`)
    come from transformers' RoPE registry; `dynamic` recomputes the frequencies once a sequence outgrows the
    trained context."""

    def __init__(self, config: Llama2Config) -> None:
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = (
            self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        )
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: Llama2Config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """theta_i = base^(-2i/d), the frequencies of the original RoPE paper."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles in fp32 even under autocast: bf16 positions lose whole integers beyond 256.
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :].float()
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys of shape (batch, heads, seq, head_dim) by their positions' angles."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def joint_products(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """`linear(x)` for each of `linears` (a layer's q, k and v projections, or gate and up). Linear layers of one
    class that compute several products of one input together say so with a static `joint_forward(x, linears)` (the
    inference package's CPU linears: a decode step's q, k and v in one kernel call, where no layer has hooks); any
    others, PEFT's wrapped layers among them, run one by one."""
    kind = type(linears[0])
    joint_forward = getattr(kind, "joint_forward", None)
    if joint_forward is not None and all(type(linear) is kind for linear in linears):
        return joint_forward(x, linears)
    return tuple(linear(x) for linear in linears)


class Llama2MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Llama2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = joint_products(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act_fn(gate) * up)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Share each key/value head with its group of `n_rep` query heads: (b, kv, s, d) -> (b, kv * n_rep, s, d)."""
    if n_rep == 1:
        return hidden_states
    batch, num_key_value_heads, seq_len, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention; the only implementation that can return the attention weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask[:, :, :, : key.shape[-2]]
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def one_query_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA for one query token with grouped key/value heads: the `n_rep` query heads of a group become `n_rep`
    queries of its key/value head, (b, kv * n_rep, 1, d) -> (b, kv, n_rep, d), so that keys and values are read
    where they are. transformers' "sdpa" does the same, but not inside `torch.compile`, where it repeats the key
    and value heads: a copy of the whole cache in every layer of every compiled decode step (125M GQA, int8, decode
    b=8: 1.08x [1.02, 1.17] the speed with the copy)."""
    batch, heads, _, head_dim = query.shape
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], head_dim)
    if attention_mask is not None:  # (b, 1, 1, kv_len): one mask for the whole group
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    attn_output = nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return attn_output.reshape(batch, 1, heads, head_dim), None


def shared_prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Softmax attention of each row over its prompt, shared by the rows that continue it, then over its own keys
    and values (the cache's slots, under `attention_mask`). `prefix` is the prompts' keys and values, (prompts,
    kv, slots, d), and a mask of their filled slots, (prompts, slots); rows `i * n` to `i * n + n - 1` continue
    prompt `i`. Each prompt is read once a step for its n rows, where a cache holding it in every row reads it n
    times (n samples of each prompt, `decoding.sample_n`)."""
    prefix_keys, prefix_values, prefix_mask = prefix
    batch, heads, length, head_dim = query.shape
    prompts, kv_heads = prefix_keys.shape[:2]
    grouped = query.view(prompts, batch // prompts, kv_heads, heads // kv_heads, length, head_dim)
    shared = torch.einsum("pnkgld,pksd->pnkgls", grouped, prefix_keys) * scaling
    shared = shared.masked_fill(~prefix_mask[:, None, None, None, None, :], float("-inf"))
    grouped = grouped.reshape(batch, kv_heads, heads // kv_heads, length, head_dim)
    own = torch.einsum("bkgld,bksd->bkgls", grouped, key) * scaling
    if attention_mask is not None:  # (b, 1, l, slots): the same for every head of a group
        mask = attention_mask[:, :, None, :, : key.shape[-2]]
        own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask
    scores = torch.cat([shared.reshape(batch, *own.shape[1:-1], -1), own], dim=-1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    shared_weights, own_weights = weights.split([prefix_keys.shape[-2], key.shape[-2]], dim=-1)
    shared_weights = shared_weights.reshape(prompts, batch // prompts, *shared_weights.shape[1:])
    attn_output = torch.einsum("pnkgls,pksd->pnkgld", shared_weights, prefix_values).reshape(grouped.shape)
    attn_output = attn_output + torch.einsum("bkgls,bksd->bkgld", own_weights, value)
    return attn_output.reshape(batch, heads, length, head_dim).transpose(1, 2), None


class Llama2Attention(nn.Module):
    """Grouped-query self-attention: `num_attention_heads` query heads share `num_key_value_heads` key/value
    heads. The kernel (eager, sdpa, flash, flex, ...) comes from transformers' attention registry; one-token steps
    under "sdpa" with grouped heads take `one_query_sdpa_attention` (any under "sdpa" take `one_token_attention`
    where it is set), and a cache layer that holds prompts shared by
    several rows each (a `shared_prefix` attribute: their keys, values and filled slots) `shared_prefix_attention`."""

    # One-token steps under "sdpa" call this instead of `one_query_sdpa_attention` where it is set (the inference
    # package's CPU kernel: `cpu_kernels.use_cpu_kernels`); it falls back itself where its kernel does not apply.
    one_token_attention: Callable | None = None

    def __init__(self, config: Llama2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = joint_products(hidden_states, self.q_proj, self.k_proj, self.v_proj)
        query_states = query.view(hidden_shape).transpose(1, 2)
        key_states = key.view(hidden_shape).transpose(1, 2)
        value_states = value.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        prefix = None
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
            prefix = getattr(cache.layers[self.layer_idx], "shared_prefix", None)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if prefix is not None:
            attention_interface = partial(shared_prefix_attention, prefix=prefix)
        elif (
            self.config._attn_implementation == "sdpa"
            and query_states.shape[2] == 1
            and (attention_mask is None or attention_mask.shape[1] == 1)
        ):
            if self.one_token_attention is not None:
                attention_interface = self.one_token_attention
            elif self.num_key_value_groups > 1:
                attention_interface = one_query_sdpa_attention
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights


class Llama2DecoderLayer(GradientCheckpointingLayer):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Llama2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Llama2Attention(config, layer_idx)
        self.mlp = Llama2MLP(config)
        self.input_layernorm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, attn_weights


class Llama2PreTrainedModel(PreTrainedModel):
    config_class = Llama2Config
    config: Llama2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Llama2DecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True


class Llama2Model(Llama2PreTrainedModel):
    """The decoder stack: token embeddings -> N decoder layers -> final RMSNorm."""

    def __init__(self, config: Llama2Config) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Llama2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Llama2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Llama2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if "past_key_values" in kwargs:  # the name before transformers 5.24
            cache = kwargs.pop("past_key_values")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed layers would write their keys and values to the cache twice

        if inputs_embeds is None:
            self._check_input_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)
        # The mask is built as if there were no cache when the cache starts empty here: transformers then
        # detects packed sequences (position_ids restarting at 0) and keeps attention inside each of them.
        new_cache = use_cache and cache is None
        if new_cache:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        self._check_context(position_ids)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None if new_cache else cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for decoder_layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                cache=cache,
                **kwargs,
            )
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse an empty input, and ids outside the embedding table with their range, instead of the embedding's
        bare IndexError (a device-side assert on CUDA). Like the context check, the id range is not checked in
        single-token decode steps (they feed back the model's own tokens) nor under compile, which keeps both free
        of a device sync."""
        if input_ids.shape[-1] == 0:
            raise ValueError("`input_ids` holds no tokens: a prompt needs at least one (Llama 2's start with BOS).")
        if input_ids.shape[-1] <= 1 or torch.compiler.is_compiling() or input_ids.device.type == "meta":
            return
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"`input_ids` holds token ids from {low} to {high}, outside the vocabulary [0, "
                f"{self.config.vocab_size}) (`vocab_size`): was the text encoded with another model's tokenizer?"
            )

    def _check_context(self, position_ids: torch.Tensor) -> None:
        """Refuse a prompt or training sequence past the trained context unless a RoPE scaling stretches it:
        unscaled RoPE beyond it gives fluent-looking garbage rather than an error. Single-token decode steps
        are not checked, to keep them free of a device sync."""
        if position_ids.shape[-1] <= 1 or self.config.rope_parameters["rope_type"] != "default":
            return
        if torch.compiler.is_compiling() or position_ids.device.type == "meta":
            return
        last = int(position_ids.max())
        if last >= self.config.max_position_embeddings:
            raise ValueError(
                f"Position {last} is past the model's context of {self.config.max_position_embeddings} tokens "
                "(`max_position_embeddings`). Shorten the input, or set a RoPE scaling "
                "(e.g. `rope_parameters={'rope_type': 'dynamic', 'factor': 2.0}`) to stretch the context."
            )


class Llama2ForCausalLM(Llama2PreTrainedModel, GenerationMixin):
    """Llama 2 with its language-model head; `generate()` comes from transformers' `GenerationMixin`, its greedy and
    sampled decoding with `cache_implementation="static"` from `static_cache_sampler`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    # A method: `modeling_llama2.inference.generate_routing.sample`, set when the package is imported. The inference
    # package imports this module, so this module cannot import it; a copy of this file loaded as remote code (which
    # has no package beside it) keeps None, hence transformers' loop.
    static_cache_sampler: Callable | None = None

    def __init__(self, config: Llama2Config) -> None:
        super().__init__(config)
        self.model = Llama2Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _validate_generated_length(self, generation_config, input_ids_length: int, has_default_max_length: bool):
        """Also refuse a `generate` (hence `pipeline`) request whose prompt plus new tokens outgrows the context:
        transformers only warns once it has happened. `_validate_generated_length` is private to transformers'
        `GenerationMixin` (5.24); it is the one hook that sees the final `max_length` (prompt + `max_new_tokens`, or
        `max_length` as given) before any compute. `test_generate_past_the_context_is_refused` fails if a later
        transformers stops calling it."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        check_generation_length(self.config, input_ids_length, generation_config.max_length - input_ids_length)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        """Greedy and sampled `generate` (hence `pipeline`) with `cache_implementation="static"` through
        `static_cache_sampler`, transformers' loop for what it declines (it returns None). `_sample` is private to
        transformers' `GenerationMixin` (5.24): the decoding method `generate` calls for both modes once the
        configuration, inputs, logits processors and stopping criteria are resolved, with the arguments of a
        `custom_generate` callable; overriding it leaves every other mode and preparation step as it is.
        `test_generate_routing.py` fails if a later transformers stops calling it."""
        if self.static_cache_sampler is not None and generation_config.cache_implementation == "static":
            ids = self.static_cache_sampler(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)
            if ids is not None:
                return ids
        return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config, **kwargs)

    @property
    def loss_function(self) -> Callable:
        """`causal_lm_loss`, unless another loss was assigned here or chosen with `loss_type`."""
        if hasattr(self, "_loss_function") or self.loss_type != "ForCausalLM":
            return super().loss_function
        return causal_lm_loss

    @loss_function.setter
    def loss_function(self, value: Callable) -> None:
        self._loss_function = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels` are the input ids themselves (shifted inside the loss), -100 where no loss is wanted.
        `logits_to_keep=k` computes logits for the last k positions only (0: all), which `generate` uses to
        skip the vocabulary projection of the prompt. `skip_logits=True` with `labels` (the name Liger's models and
        transformers' `Trainer` give it) returns the loss alone, taken from the hidden states without materializing
        the logits, the largest tensors of a training step; under `torch.compile`, with another loss function or
        an adapted LM head, the logits are computed and returned as usual."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if (
            skip_logits
            and labels is not None
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and type(self.lm_head) is nn.Linear
            and self.loss_function is causal_lm_loss
            and not torch.compiler.is_compiling()
        ):
            loss = causal_lm_head_loss(hidden_states, self.lm_head.weight, labels, **kwargs)
            return CausalLMOutputWithPast(
                loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states, attentions=outputs.attentions
            )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class Llama2ForSequenceClassification(Llama2PreTrainedModel):
    """Llama 2 with a linear head on the last real token: the reward models of Llama 2-Chat (`num_labels=1`).

    The last real token is found from `attention_mask` when given, which is right under left and right padding
    even when the pad id equals EOS; otherwise from `pad_token_id`."""

    def __init__(self, config: Llama2Config) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = Llama2Model(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        batch_size, seq_len = logits.shape[:2]
        positions = torch.arange(seq_len, device=logits.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -seq_len:].to(logits.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids.to(logits.device) != self.config.pad_token_id
        elif batch_size == 1 or input_ids is None:
            real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=logits.device)
        else:
            raise ValueError(
                "Cannot find the last token of a padded batch: pass `attention_mask` or set `config.pad_token_id`."
            )
        last_token = torch.where(real, positions, -1).amax(dim=-1).clamp(min=0)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last_token]

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled_logits, config=self.config)

        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=pooled_logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

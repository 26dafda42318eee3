"""`model.generate(..., cache_implementation="static")` (and `pipeline`, with it in `generation_config.json`)
through `decoding`'s static-cache step.

`Llama2ForCausalLM._sample` hands greedy and sampled requests for a static cache to `sample`, after `generate`
has resolved the configuration and built its logits processors and stopping criteria. The prompt is prefilled
into a `DynamicCache` as the default `generate` does (`decoding.prefill`), copied into a `StaticCache` (or, for
`num_return_sequences` > 1, prefilled and kept once for its samples: `decoding.SharedPrefixCache`), and each new
token is one call of a fixed-shape step; there is no per-token input preparation or cache bookkeeping. The
scores come from `generate`'s own processors, in its order, and a sample from `torch.multinomial` on their
softmax: the same draws at the same RNG state, so greedy and seeded sampled tokens equal the default `generate`'s.

Compiling the step costs tens of seconds on a CPU, which a short generation never earns back: it runs eagerly
until this model has spent `COMPILE_AFTER_SECONDS` in eager decoding (then compiled, for the rest of the process),
compiled at once with `generation_config.compile_config` (and, as in transformers, on CUDA or XPU), and never with
`disable_compile`. On a CPU the rule's compile is ahead of time (`ahead_of_time`, kept on disk), and a step
already on disk is loaded at once; a `compile_config` keeps `torch.compile`, whose options it holds. Everything
`sample` declines (`unsupported` says why) runs in transformers' loop.
"""

import logging
import time
import weakref

import torch
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    StaticCache,
    StoppingCriteriaList,
)

from .. import torch_internals
from . import ahead_of_time, decoding

logger = logging.getLogger(__name__)

# What `generate` passes on for a decoder-only prompt of token ids (the tokenizer: stop strings, already in the
# stopping criteria); anything else (`inputs_embeds`, `output_attentions`, extra model inputs) goes to transformers'
# loop.
ROUTED_KWARGS = {"attention_mask", "position_ids", "cache", "logits_to_keep", "use_cache", "tokenizer"}
# On these, transformers compiles a static-cache decode step unless told not to (`disable_compile`).
COMPILED_BY_DEFAULT = ("cuda", "xpu")
# Compile a model's step once its eager steps have lost about what compiling costs (the ski-rental rule: never
# more than twice the time of the better choice made in hindsight). Measured on the 15M shape (README): a compile
# costs the first call ~40 s (7 s with inductor's on-disk cache warm) and makes a 128-token generate 1.4-1.8x
# faster (decoding.generate's loop: up to 3.8x), so eager steps lose 30-75% of their time: a minute of them, about
# one compile.
COMPILE_AFTER_SECONDS = 60.0
AUTO_COMPILE_CONFIG: CompileConfig | None = None  # transformers' default
_eager_seconds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> seconds in eager decode loops


def unsupported(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    generation_config: GenerationConfig,
    *,
    synced_gpus: bool,
    model_kwargs: dict,
) -> str | None:
    """Why `sample` declines this request, or None when it decodes it."""
    if generation_config.cache_implementation != "static" or not isinstance(model_kwargs.get("cache"), StaticCache):
        return "no static cache (`cache_implementation='static'` with `use_cache=True`)"
    if extra := set(model_kwargs) - ROUTED_KWARGS:
        return f"model inputs {sorted(extra)}"
    if generation_config.return_dict_in_generate:
        return "`return_dict_in_generate` (scores, logits, attentions, hidden states, the cache)"
    if synced_gpus:
        return "`synced_gpus`"
    if generation_config.is_assistant:
        return "an assistant model's drafts"
    if generation_config.prefill_chunk_size is not None:
        return "`prefill_chunk_size`"
    if model.training:
        return "a model in training mode (dropout would draw other random numbers)"
    if (attention := model.config._attn_implementation) not in ("sdpa", "eager"):
        return f"attention implementation {attention!r} (the step is tested with sdpa and eager)"
    mask, positions = model_kwargs.get("attention_mask"), model_kwargs.get("position_ids")
    expected = torch.arange(input_ids.shape[1])[None] if mask is None else decoding.padded_positions(mask)
    if positions is not None and not torch.equal(positions, expected.to(positions.device).expand_as(positions)):
        return "`position_ids` other than the attention mask's"
    return None


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.Tensor | None:
    """Prompt plus new tokens (batch, length) for `GenerationMixin._sample`'s arguments, or None where `unsupported`
    (the caller then runs transformers' loop)."""
    reason = unsupported(model, input_ids, generation_config, synced_gpus=synced_gpus, model_kwargs=model_kwargs)
    if reason is not None:
        logger.info(f"generate runs transformers' loop, not the static-cache step: {reason}")
        return None
    attention_mask = model_kwargs.get("attention_mask")  # None when no row is padded (`generate` drops all-ones)
    slots = model_kwargs["cache"].get_max_length()  # max_length - 1, or more to match earlier calls (no recompile)
    steps = generation_config.max_length - input_ids.shape[1] - 1  # the last new token is never fed
    samples = generation_config.num_return_sequences or 1
    shared = shared_prompts(model, input_ids, attention_mask, samples) if steps > 0 else None
    positions, slots_mask = None, None
    if shared is not None:  # each prompt prefilled and kept once for its samples
        prompt_ids, prompt_mask = shared
        logits, cache = decoding.shared_prefill(
            model, prompt_ids, samples=samples, max_new_tokens=steps, prefix_slots=slots - steps,
            attention_mask=prompt_mask,
        )  # fmt: skip
        positions = cache.next_positions
    else:
        logits, cache = decoding.prefill(model, input_ids, slots, attention_mask=attention_mask)
        if attention_mask is not None:
            positions, slots_mask = decoding.padded_step_inputs(attention_mask, cache)
    logits = logits.float()
    compiled = compiled_forward(model, generation_config)
    forward = model if compiled is None else decoding.guarded_once(compiled)
    ahead_of_time_step = None
    if steps > 0 and ahead_of_time_applies(model, cache, input_ids.shape[0], generation_config):
        ahead_of_time_step = ahead_of_time.compile_step(
            step, model, cache, input_ids[:, -1].contiguous(), settings=(), position_ids=positions,
            attention_mask=slots_mask, compile=compiled is not None,
        )  # fmt: skip
    # Rows that stop continue with the pad id `generate` resolved (the first EOS id when none is set); transformers
    # keeps it only in this private attribute of its working copy of the configuration.
    pad_token_id = generation_config._pad_token_tensor
    pads_finished = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    start = time.perf_counter()
    with torch_internals.recompile_limit(decoding.MAX_COMPILED_STEPS):
        for _ in range(generation_config.max_length - input_ids.shape[1]):
            scores = logits_processor(input_ids, logits)
            if generation_config.do_sample:
                tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                tokens = scores.argmax(dim=-1)
            if pads_finished:
                tokens = tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
            unfinished = unfinished & ~stopping_criteria(input_ids, None)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if unfinished.max() == 0:
                break
            if ahead_of_time_step is not None:
                logits = ahead_of_time_step(tokens, positions, slots_mask)
            else:
                logits = step(forward, tokens, cache, positions, slots_mask)
            positions = None if positions is None else positions + 1
    if compiled is None and ahead_of_time_step is None:
        _eager_seconds[model] = _eager_seconds.get(model, 0.0) + time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    return input_ids


def shared_prompts(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, samples: int
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The distinct prompts (and their mask) where `generate` repeated each `samples` times in a row
    (`num_return_sequences`) and the attention kernel reads prompts shared by rows; else None (every row its own)."""
    if samples < 2 or model.config._attn_implementation not in decoding.SHARED_PREFIX_ATTENTION:
        return None
    ids = input_ids.unflatten(0, (-1, samples))
    mask = None if attention_mask is None else attention_mask.unflatten(0, (-1, samples))
    if not torch.equal(ids, ids[:, :1].expand_as(ids)) or (
        mask is not None and not torch.equal(mask, mask[:, :1].expand_as(mask))
    ):
        return None
    return ids[:, 0], None if mask is None else mask[:, 0]


def ahead_of_time_applies(
    model: PreTrainedModel, cache: StaticCache, rows: int, generation_config: GenerationConfig
) -> bool:
    """Whether the steps may go through a step compiled ahead of time (on a CPU: `ahead_of_time.applies`), neither
    `disable_compile` nor a `compile_config` (whose options are `torch.compile`'s) set: `sample` then compiles it by
    this module's rule, or takes one already compiled (in this process or on disk) at once."""
    return (
        not generation_config.disable_compile
        and generation_config.compile_config is None
        and ahead_of_time.applies(model, cache, rows)
    )


def compiled_forward(model: PreTrainedModel, generation_config: GenerationConfig):
    """The compiled forward the steps call (`PreTrainedModel.get_compiled_call`, kept on the model), or None to run
    them eagerly."""
    if generation_config.disable_compile:
        return None
    if generation_config.compile_config is not None or model.device.type in COMPILED_BY_DEFAULT:
        return model.get_compiled_call(generation_config.compile_config)
    if _eager_seconds.get(model, 0.0) >= COMPILE_AFTER_SECONDS:
        return model.get_compiled_call(AUTO_COMPILE_CONFIG)
    return None


def step(
    forward, tokens: torch.Tensor, cache: StaticCache, positions: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """Last-position logits (fp32, a copy: a CUDA graph's next replay overwrites its outputs) of feeding `tokens`
    (batch,) at the cache's next slot: the fixed-shape decode step."""
    logits = forward(
        input_ids=tokens[:, None], cache=cache, use_cache=True, position_ids=positions, attention_mask=mask
    ).logits
    return logits[:, -1].to(copy=True, dtype=torch.float32)

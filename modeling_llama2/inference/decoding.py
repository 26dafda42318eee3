"""Fast decoding in the manner of gpt-fast: a static KV cache, one compiled single-token step, and a loop that
does nothing per token but call it.

Decoding one token at a time reads every weight once per step, and on small models the Python around each
step (transformers' `generate` adds logits processors, stopping criteria and cache bookkeeping) costs as much
as the matrix products. Here the prompt is prefilled into a `DynamicCache` (no wasted attention over empty slots;
eagerly, or compiled with dynamic shapes once for all prompt lengths), its keys and values are copied into a
`StaticCache`, and the decode step (forward, temperature, sampling) is one graph of fixed shapes: on a CPU compiled
ahead of time (`ahead_of_time`: each token one call into compiled C++), elsewhere, and for what `torch.export`
cannot capture, one `torch.compile(fullgraph=True)` graph.

`sample_n` prefills each prompt once and keeps its keys and values once for its N samples (`SharedPrefixCache`;
also `generate(num_return_sequences=N, cache_implementation="static")`), where transformers' own loop prefills N
copies of the prompt and every step reads all N.
"""

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, StaticCache

from .. import torch_internals
from ..modeling_llama2 import check_generation_length
from . import ahead_of_time
from .cpu_kernels import kernel_takes

T = TypeVar("T")


def select_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Next token ids of shape (batch,) from last-position logits: arg-max at temperature 0, else a sample from
    the smallest set of most likely tokens whose probabilities reach `top_p` (nucleus sampling; 1: all).

    Sampling goes through `inverse_cdf_sample`: inside the compiled step it needs no device-to-host sync."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the tokens before already reach top_p
        outside[..., 0] = False  # the most likely token stays, whatever top_p (Meta's sample_top_p keeps it too)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return inverse_cdf_sample(probs)


# Tokens per block of `inverse_cdf_sample`: the vocabulary's cumulative sum is taken over block sums, then inside
# the one block that holds the sample.
SAMPLE_BLOCK = 128


def inverse_cdf_sample(probs: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs` (..., vocab; rows need not sum to 1), drawn in proportion to it: the token
    whose interval of the cumulative distribution (float64) holds a uniform number u in (0, total]. A token of
    probability 0 has an empty interval and is never drawn.

    One random number a row, where the Gumbel-max trick (arg-max of p / E, E ~ Exp(1)) draws one a token, and the
    cumulative sum in two levels (over blocks, then inside one block), where a sequential scan of the vocabulary
    is slow: 0.8 ms compiled for 16 rows of 32,000 tokens on 2 CPU cores, against 4.9 ms for Gumbel-max and 4.4
    ms for one float64 scan."""
    shape, vocab = probs.shape[:-1], probs.shape[-1]
    blocks = F.pad(probs.reshape(-1, vocab), (0, -vocab % SAMPLE_BLOCK)).unflatten(-1, (-1, SAMPLE_BLOCK))
    ends = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # the cumulative probability at each block's end
    u = (1 - torch.rand(blocks.shape[0], 1, dtype=torch.float64, device=probs.device)) * ends[:, -1:]
    block = (ends < u).sum(-1, keepdim=True)  # the last block's end is the total, never below u
    inside = blocks.gather(1, block[..., None].expand(-1, 1, SAMPLE_BLOCK)).squeeze(1)
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp_min(0)), 0.0)
    token = (start + inside.cumsum(-1, dtype=torch.float64) < u).sum(-1, keepdim=True)
    # Rounding can leave u past the block's own running sum; its last token of nonzero probability then.
    last = torch.where(inside > 0, torch.arange(SAMPLE_BLOCK, device=probs.device), 0).amax(-1, keepdim=True)
    return (block * SAMPLE_BLOCK + torch.minimum(token, last)).view(shape)


def decode_step(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    cache: StaticCache,
    temperature: float,
    top_p: float = 1.0,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step: feed `tokens` (batch,) at the cache's current slot, return the next ones. Left-padded
    rows pass their own `position_ids` (batch, 1) and a mask over all the cache's slots (0 on padding)."""
    logits = model(
        input_ids=tokens[:, None], cache=cache, use_cache=True, position_ids=position_ids, attention_mask=attention_mask
    ).logits[:, -1]
    return select_next(logits, temperature, top_p)


# "reduce-overhead" replays the step as one CUDA graph on a GPU, where launching its hundreds of small kernels one
# by one took longer than running them (measured: 2.5x slower at 125M, batch 1); it changes nothing on a CPU.
compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False, mode="reduce-overhead")
# On a CPU, inductor's C++ wrapper calls the step's kernels and ops with no Python between them (15M, fp32 CPU
# kernels, paired against the Python wrapper: decode 1.15x [1.04, 1.20] at batch 1, 1.17x [0.93, 1.33] at batch 8).
# It passes tensors only: a step that passes opaque kernel objects (fbgemm's int8 packs) keeps the Python wrapper.
cpu_compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})


def _cuda_graph_step(*args) -> torch.Tensor:
    """`compiled_decode_step`, its token ids copied out: a CUDA graph's output lives in memory that its next replay
    overwrites."""
    torch.compiler.cudagraph_mark_step_begin()
    return compiled_decode_step(*args).clone()


def compiled_step(model: PreTrainedModel, device: torch.device, rows: int) -> Callable[..., torch.Tensor]:
    """The compiled decode step for `model` on `device` with `rows` rows a step (see `compiled_decode_step`,
    `cpu_compiled_decode_step`). A model holds fbgemm's packs once a long prompt ran with int8 activations, but its
    steps use them only for more rows than the int8 rows kernel takes (15M, batch 8: the C++ wrapper's step 1.08x)."""
    if device.type != "cpu":
        return _cuda_graph_step
    packs_in_step = torch_internals.holds_opaque(model) and not kernel_takes(rows)
    return compiled_decode_step if packs_in_step else cpu_compiled_decode_step


def ahead_of_time_step(
    model: PreTrainedModel,
    cache: StaticCache,
    tokens: torch.Tensor,
    temperature: float,
    top_p: float,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
) -> Callable[..., torch.Tensor] | None:
    """The decode step compiled ahead of time, with `decode_step`'s arguments, where `ahead_of_time.applies`; None
    elsewhere (then the `torch.compile` step)."""
    if not ahead_of_time.applies(model, cache, tokens.shape[0]):
        return None
    compiled = ahead_of_time.compile_step(
        decode_step, model, cache, tokens, settings=(temperature, top_p), position_ids=position_ids,
        attention_mask=attention_mask,
    )  # fmt: skip
    if compiled is None:
        return None
    return lambda model, tokens, cache, temperature, top_p, positions, mask: compiled(tokens, positions, mask)


def guarded_once(step: Callable[..., T]) -> Callable[..., T]:
    """`step`, a compiled function, for one loop whose calls pass the same model, cache and settings: the first call
    chooses (or compiles) its graph with every guard checked; the later ones check only the guards that tell its
    graphs apart (tensors' shapes and dtypes, and whatever made it recompile before). A later call that needs a new
    graph after all, which dynamo refuses to compile there, runs again with every guard checked. Sound where the
    loop's calls, every guard checked, would reuse one graph (the decode step's tests assert that): a graph that
    reads and sets Python state (not tensors) would otherwise run again on the values it was traced with. The full
    check took 0.46 ms of a 4.5 ms step (15M, fp32 CPU kernels, batch 1): decode 1.14x [1.04, 1.25] fp32, 1.15x
    [1.08, 1.31] int8 weight-only, paired."""
    checked = False

    def call(*args: Any, **kwargs: Any) -> T:
        nonlocal checked
        if checked:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return step(*args, **kwargs)
            except RuntimeError as error:  # raised before the graph runs: nothing was done twice
                if not torch_internals.refused_recompile(error):
                    raise
        checked = True
        return step(*args, **kwargs)

    return call


# The step compiles once per model structure, batch size, cache length, temperature and top-p; dynamo's default
# limit of 8 graphs per function is soon reached by a process that decodes with several models (fp32, CPU kernels,
# int8).
MAX_COMPILED_STEPS = 64


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse a negative (or NaN) temperature, which would silently sample the least likely tokens, and a top-p
    outside [0, 1]."""
    if not temperature >= 0:
        raise ValueError(f"`temperature` must be >= 0 (0: greedy), got {temperature}.")
    if not 0 <= top_p <= 1:
        raise ValueError(f"`top_p` must be in [0, 1] (1: sample from every token), got {top_p}.")


def check_request(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_cache_len: int | None,
) -> None:
    """Refuse, before any compute, what would otherwise fail deep inside the model or decode past its context: an
    empty prompt, ids outside the vocabulary, a negative `max_new_tokens`, a prompt plus new tokens longer than the
    context or than `max_cache_len`, and bad sampling settings."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` must be (batch, length) with at least one token, got shape {tuple(input_ids.shape)}."
        )
    if max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
    check_sampling(temperature, top_p)
    low, high = (int(v) for v in torch.aminmax(input_ids))
    vocab_size = model.config.vocab_size
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"`input_ids` holds token ids from {low} to {high}, outside the vocabulary [0, {vocab_size}) "
            "(`vocab_size`)."
        )
    length = input_ids.shape[1] + max_new_tokens
    check_generation_length(model.config, input_ids.shape[1], max_new_tokens)
    if max_cache_len is not None and max_cache_len < length:
        raise ValueError(
            f"`max_cache_len` {max_cache_len} is too small for a prompt of {input_ids.shape[1]} tokens plus "
            f"{max_new_tokens} new ones: pass at least {length}."
        )


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as `generate` makes them: each row counts from its first real token."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def padded_step_inputs(attention_mask: torch.Tensor, cache: StaticCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The first decode step's `position_ids` (batch, 1) and mask over all the cache's slots (0 on padding) for
    left-padded prompts with this `attention_mask`; later steps add 1 to the positions."""
    positions = attention_mask.sum(-1, keepdim=True)  # the next token's position in each row
    slots_mask = attention_mask.new_ones(attention_mask.shape[0], cache.layers[0].keys.shape[-2])
    slots_mask[:, : attention_mask.shape[1]] = attention_mask
    return positions, slots_mask


def _prompt_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    prompt_cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=prompt_cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return logits, [(layer.keys, layer.values) for layer in prompt_cache.layers]


# With dynamic shapes: one graph for every prompt length past `cpu_kernels.MAX_KERNEL_ROWS` tokens (and one below
# it), which fuses the prefill's elementwise work (RMSNorm, RoPE, SwiGLU). 15M shape, 512 tokens, fp32 CPU kernels:
# 1.21x [1.01, 1.54] eager's speed (paired), for a first call that compiles for about 25 s.
compiled_prompt_forward = torch.compile(_prompt_forward, dynamic=True, fullgraph=True)


def run_prompt(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    compile: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The prompt's last logits and each layer's keys and values (no attention over empty slots), eagerly or
    compiled (`compiled_prompt_forward`)."""
    position_ids = None if attention_mask is None else padded_positions(attention_mask)
    if not compile:
        return _prompt_forward(model, input_ids, attention_mask, position_ids)
    with torch_internals.recompile_limit(MAX_COMPILED_STEPS):
        return compiled_prompt_forward(model, input_ids.contiguous(), attention_mask, position_ids)


@torch.no_grad()
def prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    max_cache_len: int,
    batch_size: int | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    compile: bool = False,
) -> tuple[torch.Tensor, StaticCache]:
    """Run the prompt once (compiled with `compile`, see `compiled_prompt_forward`) and return its last logits and
    a `StaticCache` of `max_cache_len` slots holding its keys and values, broadcast to `batch_size` rows (default:
    the prompt's batch). Left-padded prompts pass their `attention_mask`."""
    batch_size = batch_size or input_ids.shape[0]
    logits, prompt = run_prompt(model, input_ids, attention_mask, compile=compile)
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    first = prompt[0][0]
    cache.early_initialization(batch_size, first.shape[1], first.shape[-1], first.dtype, first.device)
    length = input_ids.shape[1]
    for static, (keys, values) in zip(cache.layers, prompt, strict=False):
        static.keys[:, :, :length] = keys
        static.values[:, :, :length] = values
        static.cumulative_length.fill_(length)
    return logits, cache


class SharedPrefixCache(StaticCache):
    """A `StaticCache` for `samples` continuations of each of a batch of prompts (rows `i * samples + j`: sample
    `j` of prompt `i`; `prompt`: each layer's keys and values from `run_prompt`): each layer keeps every prompt's
    keys and values once, as its `shared_prefix` (keys, values, mask of the filled slots), which
    `shared_prefix_attention` reads once a step for all rows, and the rows' own tokens in `max_new_tokens` static
    slots. The prompts take `prefix_slots` slots (their length or more, the rest
    masked, as is the left padding under `attention_mask`), so that prompts of different lengths share one
    compiled step."""

    def __init__(
        self,
        prompt: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        config,
        samples: int,
        max_new_tokens: int,
        prefix_slots: int,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__(config=config, max_cache_len=max(max_new_tokens, 1))
        first = prompt[0][0]
        prompts, length = first.shape[0], first.shape[-2]
        self.prompt_length = length
        self.early_initialization(prompts * samples, first.shape[1], first.shape[-1], first.dtype, first.device)
        if attention_mask is None:
            attention_mask = torch.ones(prompts, length, dtype=torch.bool, device=first.device)
        filled = F.pad(attention_mask.bool(), (0, prefix_slots - length))  # (prompts, slots)
        # Each row's next position: its prompt's length without the padding.
        self.next_positions = attention_mask.sum(-1, keepdim=True).repeat_interleave(samples, dim=0)
        padding = (0, 0, 0, prefix_slots - length)
        for layer, (keys, values) in zip(self.layers, prompt, strict=True):
            layer.shared_prefix = (F.pad(keys, padding), F.pad(values, padding), filled)


@torch.no_grad()
def shared_prefill(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    samples: int,
    max_new_tokens: int,
    prefix_slots: int,
    attention_mask: torch.Tensor | None = None,
    compile: bool = False,
) -> tuple[torch.Tensor, SharedPrefixCache]:
    """Run each prompt once (compiled with `compile`, as in `prefill`) and return its last logits, repeated for
    its `samples` rows, and a `SharedPrefixCache` that keeps it once for them (`prefix_slots` slots) beside
    `max_new_tokens` slots of the rows' own."""
    logits, prompt = run_prompt(model, input_ids, attention_mask, compile=compile)
    cache = SharedPrefixCache(
        prompt, config=model.config, samples=samples, max_new_tokens=max_new_tokens, prefix_slots=prefix_slots,
        attention_mask=attention_mask,
    )  # fmt: skip
    return logits.repeat_interleave(samples, dim=0), cache


@torch.no_grad()
def decode(
    model: PreTrainedModel,
    logits: torch.Tensor,
    cache: StaticCache,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    compile: bool = True,
    top_p: float = 1.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate `max_new_tokens` (batch, new) after a prefill (of left-padded prompts: pass their
    `attention_mask`). Rows that produced `eos_token_id` continue with `pad_token_id`; decoding stops early once
    all rows have. On an accelerator that is checked every 16 tokens, as each check waits for the device; on a
    CPU after every token. The result ends where `generate` would have stopped."""
    if max_new_tokens < 0:
        raise ValueError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}.")
    check_sampling(temperature, top_p)
    filled, slots = int(cache.get_seq_length()), cache.get_max_length()
    shared = isinstance(cache, SharedPrefixCache)
    if shared and attention_mask is not None:
        raise ValueError(
            "A `SharedPrefixCache` masks its prompts' padding itself (its `attention_mask`): decode it with "
            "`attention_mask=None`."
        )
    prompt = cache.prompt_length if shared else 0  # tokens outside the slots
    if filled + max_new_tokens > slots:
        raise ValueError(
            f"The cache has {slots - filled} free slots after its {filled} prompt tokens, too few for "
            f"{max_new_tokens} new tokens: prefill with a `max_cache_len` of at least {filled + max_new_tokens}."
        )
    check_generation_length(model.config, prompt + filled, max_new_tokens)
    check_every = 1 if logits.device.type == "cpu" else 16
    tokens = select_next(logits, temperature, top_p)
    positions, slots_mask = (None, None) if attention_mask is None else padded_step_inputs(attention_mask, cache)
    if shared:  # the slots count from 0, the positions from each prompt's end
        positions = cache.next_positions + filled
    step = decode_step
    # One new token takes no step; dynamic RoPE's steps run eagerly (no fixed graph computes them).
    if compile and max_new_tokens > 1 and ahead_of_time.fixed_graph(model):
        step = ahead_of_time_step(model, cache, tokens, temperature, top_p, positions, slots_mask)
        step = step or guarded_once(compiled_step(model, logits.device, logits.shape[0]))
    out = torch.full((tokens.shape[0], max_new_tokens), pad_token_id, dtype=torch.long, device=tokens.device)
    finished = torch.zeros_like(tokens, dtype=torch.bool)
    with torch_internals.recompile_limit(MAX_COMPILED_STEPS):
        for i in range(max_new_tokens):
            out[:, i] = tokens.masked_fill(finished, pad_token_id)
            if eos_token_id is not None:
                finished |= tokens == eos_token_id
                if i % check_every == check_every - 1 and bool(finished.all()):
                    break
            if i + 1 < max_new_tokens:
                tokens = step(model, tokens, cache, temperature, top_p, positions, slots_mask)
                positions = None if positions is None else positions + 1
    if eos_token_id is not None and bool(finished.all()):
        out = out[:, : int(_first_eos(out, eos_token_id).max()) + 1]
    return out


def _first_eos(tokens: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of each row's first `eos_token_id` (the row length if none)."""
    is_eos = tokens == eos_token_id
    return torch.where(is_eos.any(-1), is_eos.int().argmax(-1), tokens.shape[-1])


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    max_cache_len: int | None = None,
    compile: bool = True,
    attention_mask: torch.Tensor | None = None,
    compile_prefill: bool = False,
) -> torch.Tensor:
    """Prompt plus continuation, (batch, prompt + new); at temperature 0 the tokens of
    `model.generate(input_ids, attention_mask=attention_mask, do_sample=False, ...)`, else samples (nucleus
    sampling below `top_p` < 1). Prompts of different lengths are left-padded, with their `attention_mask`. The
    compiled step is specialized to the cache's shape: pass one `max_cache_len` for all calls to compile once.
    `compile_prefill` compiles the prompt's forward too, once for all prompt lengths (`compiled_prompt_forward`)."""
    check_request(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        max_cache_len=max_cache_len,
    )  # fmt: skip
    max_cache_len = max_cache_len or input_ids.shape[1] + max_new_tokens
    logits, cache = prefill(model, input_ids, max_cache_len, attention_mask=attention_mask, compile=compile_prefill)
    new = decode(
        model, logits, cache, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, compile=compile, attention_mask=attention_mask,
    )  # fmt: skip
    return torch.cat([input_ids, new], dim=1)


# The attention kernels whose masks `shared_prefix_attention` takes (tensors; flex attention's are block masks).
SHARED_PREFIX_ATTENTION = ("sdpa", "eager")


@torch.no_grad()
def sample_n(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    max_cache_len: int | None = None,
    compile: bool = True,
    top_p: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    compile_prefill: bool = False,
) -> torch.Tensor:
    """`n` continuations of each prompt (prompts, length; left-padded under `attention_mask` where their lengths
    differ), as (prompts * n, length + new), row `i * n + j` sample `j` of prompt `i`. Each prompt is prefilled
    once, and its keys and values are kept once for its `n` rows (`SharedPrefixCache`) under "sdpa" and "eager"
    attention, copied to every row of a `StaticCache` under other kernels. The compiled step is specialized to
    the number of rows, `max_cache_len` and `max_new_tokens`: keep them for all calls to compile once;
    `compile_prefill` as in `generate`."""
    if n < 1:
        raise ValueError(f"`n` must be at least 1 sample, got {n}.")
    if attention_mask is not None and (
        attention_mask.shape != input_ids.shape or not bool(attention_mask.sum(-1).gt(0).all())
    ):
        raise ValueError(
            f"`attention_mask` must have the prompts' shape {tuple(input_ids.shape)} and mark at least one token "
            f"of each, got shape {tuple(attention_mask.shape)}."
        )
    check_request(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        max_cache_len=max_cache_len,
    )  # fmt: skip
    max_cache_len = max_cache_len or input_ids.shape[1] + max_new_tokens
    rows = input_ids.repeat_interleave(n, dim=0)
    row_mask = None  # a `SharedPrefixCache` masks the prompts' padding itself
    if model.config._attn_implementation in SHARED_PREFIX_ATTENTION:
        logits, cache = shared_prefill(
            model, input_ids, samples=n, max_new_tokens=max_new_tokens, prefix_slots=max_cache_len - max_new_tokens,
            attention_mask=attention_mask, compile=compile_prefill,
        )  # fmt: skip
    else:
        row_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, dim=0)
        if input_ids.shape[0] == 1:
            logits, cache = prefill(
                model, input_ids, max_cache_len, batch_size=n, attention_mask=attention_mask, compile=compile_prefill
            )
            logits = logits.expand(n, -1)
        else:
            logits, cache = prefill(model, rows, max_cache_len, attention_mask=row_mask, compile=compile_prefill)
    new = decode(
        model, logits, cache, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, compile=compile, attention_mask=row_mask,
    )  # fmt: skip
    return torch.cat([rows, new], dim=1)

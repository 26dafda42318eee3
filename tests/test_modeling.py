"""The model against transformers' `LlamaForCausalLM` on the same weights, and its own invariants."""

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import pipeline
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_llama2 import Llama2Config, Llama2ForCausalLM, loss_llama2, modeling_llama2
from modeling_llama2.loss_llama2 import causal_lm_head_loss, causal_lm_loss

from .alignment_helpers import alignment_config
from .conftest import TINY, model_pair, tiny_config

ATOL = 1e-5


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_logits_match_transformers(num_key_value_heads, attn_implementation):
    ours, ref = model_pair(num_key_value_heads=num_key_value_heads, attn_implementation=attn_implementation)
    input_ids = torch.randint(1, TINY["vocab_size"], (3, 40))
    torch.testing.assert_close(logits(ours, input_ids), logits(ref, input_ids), atol=ATOL, rtol=0)


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    # 200 positions > max_position_embeddings=128, so the NTK base is really recomputed.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(name):
    rope = {**ROPE_SCALINGS[name], "rope_theta": 50000.0}
    ours, ref = model_pair(rope_parameters=dict(rope))
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 200))
    torch.testing.assert_close(logits(ours, input_ids), logits(ref, input_ids), atol=ATOL, rtol=0)
    unscaled, _ = model_pair(
        rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, max_position_embeddings=256
    )
    assert not torch.allclose(logits(unscaled, input_ids), logits(ours, input_ids), atol=1e-3)


def test_legacy_rope_keywords_are_folded_into_rope_parameters():
    config = tiny_config(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 1e6


def test_incremental_decoding_matches_full_forward():
    ours, _ = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 24))
    full = logits(ours, input_ids)
    with torch.no_grad():
        out = ours(input_ids[:, :10], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(10, 24):
            out = ours(input_ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
    assert cache.get_seq_length() == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def left_padded_batch(prompts, pad_token_id=0):
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


@pytest.mark.parametrize("num_key_value_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_left_padded_greedy_generate_matches_transformers_and_unpadded(num_key_value_heads):
    ours, ref = model_pair(seed=1, num_key_value_heads=num_key_value_heads)
    torch.manual_seed(1)
    prompts = [torch.randint(3, TINY["vocab_size"], (n,)).tolist() for n in (5, 12, 9)]
    input_ids, attention_mask = left_padded_batch(prompts)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        batched = ours.generate(input_ids, attention_mask=attention_mask, **kwargs)
        reference = ref.generate(input_ids, attention_mask=attention_mask, **kwargs)
        assert torch.equal(batched, reference)
        for row, prompt in enumerate(prompts):
            alone = ours.generate(torch.tensor([prompt]), **kwargs)
            assert batched[row, input_ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


@pytest.mark.parametrize("num_key_value_heads", [2, 1], ids=["gqa", "mqa"])
def test_one_token_steps_take_grouped_sdpa_and_match_transformers(monkeypatch, num_key_value_heads):
    ours, ref = model_pair(seed=3, num_key_value_heads=num_key_value_heads, attn_implementation="sdpa")
    calls, grouped = [], modeling_llama2.one_query_sdpa_attention
    spy = lambda *args, **kwargs: calls.append(1) or grouped(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(modeling_llama2, "one_query_sdpa_attention", spy)
    input_ids, attention_mask = left_padded_batch([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        out = {m: m(input_ids, attention_mask=attention_mask, use_cache=True) for m in (ours, ref)}
        assert not calls  # a prompt of several tokens keeps transformers' kernel
        for token in (15, 16, 17):
            attention_mask = torch.cat([attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)], dim=1)
            step = torch.full((2, 1), token)
            out = {
                m: m(step, attention_mask=attention_mask, past_key_values=out[m].past_key_values, use_cache=True)
                for m in (ours, ref)
            }
            torch.testing.assert_close(out[ours].logits, out[ref].logits, atol=ATOL, rtol=0)
    assert len(calls) == 3 * ours.config.num_hidden_layers


def test_static_cache_generate_matches_dynamic():
    ours, _ = model_pair(seed=2)
    input_ids, attention_mask = left_padded_batch([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        dynamic = ours.generate(input_ids, **kwargs)
        static = ours.generate(input_ids, cache_implementation="static", **kwargs)
    assert torch.equal(dynamic, static)


def test_explicit_position_ids():
    ours, ref = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 16))
    # With an attention mask, a jump in position_ids is a jump in position (without one, transformers reads
    # it as the start of a packed sequence).
    gapped = dict(
        position_ids=torch.cat([torch.arange(8), torch.arange(30, 38)]).unsqueeze(0), attention_mask=torch.ones(1, 16)
    )
    torch.testing.assert_close(logits(ours, input_ids, **gapped), logits(ref, input_ids, **gapped), atol=ATOL, rtol=0)
    assert not torch.allclose(logits(ours, input_ids, **gapped), logits(ours, input_ids), atol=1e-4)
    # RoPE encodes relative positions: shifting all of them changes nothing.
    shifted = torch.arange(7, 23).unsqueeze(0)
    torch.testing.assert_close(
        logits(ours, input_ids, position_ids=shifted), logits(ours, input_ids), atol=ATOL, rtol=0
    )


def test_attention_mask_hides_padding():
    ours, _ = model_pair()
    prompt = torch.randint(1, TINY["vocab_size"], (1, 10))
    alone = logits(ours, prompt)[:, -1]
    input_ids, attention_mask = left_padded_batch([prompt[0].tolist(), list(range(3, 20))])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    padded = logits(ours, input_ids, attention_mask=attention_mask, position_ids=position_ids)[:1, -1]
    torch.testing.assert_close(padded, alone, atol=ATOL, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config()).train()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 16))

    def grads():
        model.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "loss_kwargs",
    [{}, {"num_items_in_batch": torch.tensor(40)}, {"num_items_in_batch": 40}, {"shift_labels": True}],
    ids=["mean", "num_items_tensor", "num_items_int", "shift_labels"],
)
def test_loss_and_gradients_match_transformers(loss_kwargs):
    ours, ref = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 16))
    labels = input_ids.clone()
    labels[:, :5] = -100
    if loss_kwargs.get("shift_labels"):  # labels already shifted, as for sequence parallelism
        loss_kwargs = {"shift_labels": torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)}

    def loss_and_grads(model):
        model.zero_grad()
        loss = model(input_ids, labels=labels, **loss_kwargs).loss
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    (ours_loss, ours_grads), (ref_loss, ref_grads) = loss_and_grads(ours), loss_and_grads(ref)
    torch.testing.assert_close(ours_loss, ref_loss, atol=1e-6, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_loss_equals_transformers_loss_over_several_blocks(dtype):
    """Enough rows for several of `TokenCrossEntropy`'s blocks; bf16 logits are still reduced in fp32."""
    vocab = 2**13  # 64 rows per block
    logits = torch.randn(3, 100, vocab, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (3, 100))
    labels[0, :30] = -100
    ref = ForCausalLMLoss(logits, labels, vocab)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    ours = causal_lm_loss(logits, labels, vocab)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    assert ours.dtype == ref.dtype == torch.float32 and ours_grad.dtype == dtype
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours_grad.float(), ref_grad.float(), atol=1e-7 if dtype == torch.float32 else 1e-6, rtol=0
    )
    # Like F.cross_entropy: nothing to learn from gives NaN (0 / 0) under the mean, 0 under a given divisor.
    ignored = torch.full_like(labels, -100)
    assert causal_lm_loss(logits, ignored, vocab).isnan() and ForCausalLMLoss(logits, ignored, vocab).isnan()
    assert causal_lm_loss(logits, ignored, vocab, num_items_in_batch=5) == 0


def test_loss_saves_no_second_logits_sized_tensor_for_backward():
    """Through autograd's saved-tensor hooks: the loss keeps the logits the output holds anyway (and one float a
    token), where `F.cross_entropy` keeps their log-softmax as well."""
    ours, ref = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 64))

    def saved_logits_sized(model) -> tuple[set[int], int]:
        saved = set()

        def pack(tensor):
            if tensor.numel() == input_ids.numel() * TINY["vocab_size"]:
                saved.add(tensor.untyped_storage().data_ptr())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = model(input_ids, labels=input_ids)
        output.loss.backward()
        return saved, output.logits.untyped_storage().data_ptr()

    saved, logits = saved_logits_sized(ours)
    assert saved == {logits}
    saved, logits = saved_logits_sized(ref)
    assert saved - {logits}


@pytest.mark.parametrize(
    "loss_kwargs",
    [{}, {"num_items_in_batch": torch.tensor(40)}, {"shift_labels": True}],
    ids=["mean", "num_items", "shift_labels"],
)
def test_skip_logits_gives_the_logits_path_loss_and_gradients_without_logits(loss_kwargs, monkeypatch):
    """Over several blocks of the LM head (5 tokens each), against the same model's loss from its logits."""
    monkeypatch.setattr(loss_llama2, "_head_block_rows", lambda weight: 5)
    ours, _ = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 16))
    labels = input_ids.clone()
    labels[:, :5] = -100
    if loss_kwargs.get("shift_labels"):
        loss_kwargs = {"shift_labels": torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)}

    def loss_and_grads(**kwargs):
        ours.zero_grad()
        output = ours(input_ids, labels=labels, **loss_kwargs, **kwargs)
        output.loss.backward()
        return output, {name: p.grad.clone() for name, p in ours.named_parameters()}

    (skipped, skipped_grads), (full, full_grads) = loss_and_grads(skip_logits=True), loss_and_grads()
    assert skipped.logits is None and full.logits is not None
    torch.testing.assert_close(skipped.loss, full.loss, atol=1e-6, rtol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(skipped_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        evaluated = ours(input_ids, labels=labels, skip_logits=True, **loss_kwargs).loss
    torch.testing.assert_close(evaluated, full.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_lm_head_loss_equals_causal_lm_loss_of_the_logits(dtype, monkeypatch):
    """bf16 hidden states and weight: the logits are rounded to bf16 as the LM head's would be, then reduced in fp32;
    the gradients, taken in fp32 (the logits path rounds the logits' gradient to bf16 first), are returned in bf16
    and agree to bf16's precision."""
    monkeypatch.setattr(loss_llama2, "_head_block_rows", lambda weight: 64)
    hidden = torch.randn(3, 100, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(1000, 32, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 1000, (3, 100))
    labels[0, :30] = -100
    ref = causal_lm_loss(hidden @ weight.T, labels, 1000, num_items_in_batch=250)
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    ours = causal_lm_head_loss(hidden, weight, labels, num_items_in_batch=250)
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    assert ours.dtype == torch.float32 and [g.dtype for g in ours_grads] == [dtype, dtype]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    for got, expected in zip(ours_grads, ref_grads, strict=True):
        atol = 1e-6 if dtype == torch.float32 else 2**-7 * expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=1e-5)


def test_skip_logits_returns_the_logits_where_it_cannot_skip_them():
    """Another loss function (given the logits), or logits asked for only in part: computed and returned as usual."""
    ours, _ = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 8))
    last = ours(input_ids, labels=input_ids[:, -3:], skip_logits=True, logits_to_keep=3)
    assert last.logits.shape[1] == 3 and last.loss == ours(input_ids, labels=input_ids[:, -3:], logits_to_keep=3).loss
    assert ours(input_ids, skip_logits=True).logits is not None  # no labels, no loss: the logits are the output
    ours.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 42.0
    output = ours(input_ids, labels=input_ids, skip_logits=True)
    assert output.loss.item() == 42.0 and output.logits is not None


def test_an_assigned_loss_function_replaces_the_default():
    ours, _ = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 8))
    ours.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 42.0
    assert ours(input_ids, labels=input_ids).loss.item() == 42.0


def test_compiled_training_step_takes_the_plain_loss_and_matches_eager():
    ours, _ = model_pair()
    ours.train()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 16))
    eager = ours(input_ids, labels=input_ids).loss
    compiled = torch.compile(ours, backend="eager", fullgraph=True)(input_ids, labels=input_ids).loss
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)


def test_hidden_states_and_attentions_are_returned():
    ours, _ = model_pair(attn_implementation="eager")
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        out = ours(input_ids, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert out.attentions[0].shape == (2, TINY["num_attention_heads"], 7, 7)
    # Causal: no weight on the future.
    assert torch.all(out.attentions[0].triu(diagonal=1) == 0)


def test_logits_to_keep_computes_only_the_last_positions():
    ours, _ = model_pair()
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 9))
    last = logits(ours, input_ids, logits_to_keep=1)
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, logits(ours, input_ids)[:, -1:], atol=ATOL, rtol=0)


def test_tied_embeddings_share_one_tensor():
    model = Llama2ForCausalLM(tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_prompt_longer_than_the_context_is_refused():
    ours, _ = model_pair(max_position_embeddings=32)
    with pytest.raises(ValueError, match="context of 32 tokens"):
        ours(torch.randint(1, TINY["vocab_size"], (1, 33)))
    ours(torch.randint(1, TINY["vocab_size"], (1, 32)))


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=60, num_attention_heads=8), "num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(rope_parameters={"rope_type": "ntk-by-parts", "factor": 2.0}), "rope_type"),
        (dict(rope_scaling={"type": "linear", "factor": 0.5}), "factor"),
        (dict(rope_scaling={"type": "dynamic"}), "factor"),
        (dict(rope_theta=-1.0), "rope_theta"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(intermediate_size=0), "`intermediate_size` must be a positive integer, got 0"),
        (dict(max_position_embeddings=-4), "`max_position_embeddings` must be a positive integer, got -4"),
        (dict(head_dim=0), "`head_dim` must be a positive integer, got 0"),
        (dict(rms_norm_eps=-1e-5), r"`rms_norm_eps` must be a positive finite number \(Llama 2: 1e-5\), got -1e-05"),
        (dict(rms_norm_eps=float("nan")), "`rms_norm_eps` must be a positive finite number .*got nan"),
        (dict(rope_theta=float("nan")), "`rope_theta` must be a positive finite number .*got nan"),
        (dict(rope_theta=float("inf")), "`rope_theta` must be a positive finite number .*got inf"),
        (dict(rope_theta="10000"), "`rope_theta` must be a positive finite number .*got '10000'"),
        (dict(rope_scaling={"type": "linear", "factor": float("nan")}), r"`rope_parameters\['factor'\]` .*got nan"),
        (dict(rope_scaling={"type": "dynamic", "factor": float("inf")}), r"`rope_parameters\['factor'\]` .*got inf"),
        (dict(hidden_act="swiglu"), "`hidden_act` is 'swiglu', which transformers does not know; use one of .*silu"),
        (dict(pad_token_id=96), r"`pad_token_id` must be a token id in \[0, 96\) .*or null .*got 96"),
        (dict(pad_token_id=-1), r"`pad_token_id` must be a token id in \[0, 96\) .*got -1"),
    ],
)
def test_config_refuses_a_bad_value_naming_field_value_and_range(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_type_errors_come_from_the_strict_dataclass():
    # huggingface_hub's @strict already refuses a string or float where an int belongs, naming the field.
    with pytest.raises(StrictDataclassFieldValidationError, match="'intermediate_size' expected int, got str"):
        tiny_config(intermediate_size="128")


LLAMA2_HUB_CONFIGS = {  # config.json of meta-llama/Llama-2-{7b,13b,70b}-hf, the keys that matter
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
}


@pytest.mark.parametrize("size", list(LLAMA2_HUB_CONFIGS))
@pytest.mark.parametrize(
    "extra",
    [
        {"rope_scaling": None},
        {"rope_scaling": None, "pad_token_id": 0},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_scaling": {"type": "dynamic", "factor": 4.0}, "rope_theta": 1e6},
    ],
)
def test_stock_llama2_config_json_still_loads(tmp_path, size, extra):
    config_json = {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "initializer_range": 0.02, "max_position_embeddings": 4096, "model_type": "llama", "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "torch_dtype": "float16", "use_cache": True,
        "vocab_size": 32000, **LLAMA2_HUB_CONFIGS[size], **extra,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    config = Llama2Config.from_pretrained(tmp_path)
    assert config.intermediate_size == config_json["intermediate_size"]
    assert config.pad_token_id == extra.get("pad_token_id")
    assert config.rope_parameters["rope_type"] == (extra["rope_scaling"] or {}).get("type", "default")


def test_config_defaults_are_llama2_7b():
    config = Llama2Config()
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (4096, 32, 11008)
    assert config.max_position_embeddings == 4096
    assert config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_sequences_attend_only_within_themselves(attn_implementation):
    """Sequences packed into one row with position_ids restarting at 0 give each sequence's own logits, with
    the config's default `use_cache=True` too (a fresh cache must not switch packing detection off)."""
    ours, _ = model_pair(attn_implementation=attn_implementation)
    assert ours.config.use_cache
    sequences = [torch.randint(1, TINY["vocab_size"], (n,)) for n in (7, 12, 5)]
    packed = torch.cat(sequences).unsqueeze(0)
    position_ids = torch.cat([torch.arange(len(s)) for s in sequences]).unsqueeze(0)
    packed_logits = logits(ours, packed, position_ids=position_ids)[0]
    alone = torch.cat([logits(ours, s.unsqueeze(0))[0] for s in sequences])
    torch.testing.assert_close(packed_logits, alone, atol=ATOL, rtol=0)


def test_generate_past_the_context_is_refused(tokenizer):
    # Through the private `_validate_generated_length` hook: this fails if transformers stops calling it.
    ours, _ = model_pair(max_position_embeddings=32)
    ids = torch.randint(1, TINY["vocab_size"], (1, 10))
    with pytest.raises(ValueError, match="A prompt of 10 tokens plus 23 new tokens .*context of 32 .*at most 22 new"):
        ours.generate(ids, max_new_tokens=23, do_sample=False)
    with pytest.raises(ValueError, match="A prompt of 10 tokens plus 30 new tokens"):
        ours.generate(ids, max_length=40, do_sample=False)
    free = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # no early stop
    assert ours.generate(ids, max_new_tokens=22, **free).shape == (1, 32)
    assert ours.generate(ids, **free).shape == (1, 30)  # transformers' default length, cut at the context

    torch.manual_seed(0)
    lm = Llama2ForCausalLM(alignment_config(len(tokenizer), max_position_embeddings=32)).eval()
    generator = pipeline("text-generation", model=lm, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="new tokens does not fit the model's context of 32 tokens"):
        generator("the cat sat on the mat", max_new_tokens=40, do_sample=False)


def test_empty_and_out_of_vocabulary_input_ids_are_refused():
    ours, _ = model_pair()
    with pytest.raises(ValueError, match="`input_ids` holds no tokens"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3, do_sample=False)
    with pytest.raises(ValueError, match=r"token ids from 1 to 96, outside the vocabulary \[0, 96\)"):
        ours(torch.tensor([[1, 96, 5]]))
    with pytest.raises(ValueError, match=r"token ids from -2 to 5, outside the vocabulary"):
        ours.generate(torch.tensor([[1, -2, 5]]), max_new_tokens=3, do_sample=False)

"""`examples/gqa_ablation.py`: the parameter matching against real models, the KV-bytes formula against real caches,
and `--quick` end to end (its numbers are not asserted to be good, only well formed)."""

import importlib.util
import json
import math

import pytest
import torch
from transformers import DynamicCache

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.inference import decoding

from .alignment_helpers import load_script

ablation = load_script("gqa_ablation.py")


def real_count(config) -> int:
    torch.manual_seed(0)
    return sum(p.numel() for p in Llama2ForCausalLM(config).parameters())


def base_config(hidden: int, heads: int, layers: int) -> dict:
    return dict(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads)


@pytest.mark.parametrize(
    "hidden, heads, layers, kv_heads, multiple_of",
    [(256, 8, 4, (2, 1), 8), (192, 6, 2, (3, 2, 1), 4), (128, 2, 3, (1,), 8)],
)
def test_matched_widths_give_the_mha_parameter_count(hidden, heads, layers, kv_heads, multiple_of):
    base = base_config(hidden, heads, layers)
    mha = ablation.variant_config(base, heads, 8 * hidden // 3)
    target = real_count(mha)
    assert ablation.parameter_count(mha) == target  # the meta-device count is the real one
    for kv in kv_heads:
        width = ablation.matched_intermediate_size(base, kv, target, multiple_of)
        assert width % multiple_of == 0 and width > mha.intermediate_size  # smaller K/V, wider FFN
        count = real_count(ablation.variant_config(base, kv, width))
        assert abs(count - target) / target < 0.005
        for other in (width - multiple_of, width + multiple_of):  # and no other multiple comes closer
            other_count = ablation.parameter_count(ablation.variant_config(base, kv, other))
            assert abs(other_count - target) >= abs(count - target)


def test_default_variants_match_within_a_fraction_of_a_percent():
    configs = ablation.variant_configs(ablation.Sizes())
    assert [c.num_key_value_heads for c in configs.values()] == [8, 2, 1]
    counts = [ablation.parameter_count(c) for c in configs.values()]
    assert all(abs(n - counts[0]) / counts[0] < 0.005 for n in counts)
    assert all(c.max_position_embeddings >= ablation.Sizes().prompt_tokens + ablation.Sizes().new_tokens
               for c in configs.values())  # fmt: skip


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_bytes_per_token_is_what_the_caches_hold(kv_heads):
    base = base_config(64, 4, 2) | {"max_position_embeddings": 64}
    config = ablation.variant_config(base, kv_heads, 128)
    model = Llama2ForCausalLM(config).eval()
    batch, length = 3, 10
    ids = torch.randint(config.vocab_size, (batch, length))
    expected = ablation.kv_bytes_per_token(config)
    assert expected == 2 * 2 * kv_heads * 16 * 4

    def cache_bytes(cache) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    with torch.no_grad():
        dynamic = DynamicCache(config=config)
        model(input_ids=ids, cache=dynamic, use_cache=True)
    assert cache_bytes(dynamic) == expected * batch * length
    _, static = decoding.prefill(model, ids, max_cache_len=16)
    assert cache_bytes(static) == expected * batch * 16  # a static cache holds every slot from the start


def test_quick_run_end_to_end(tmp_path, capsys):
    metrics = ablation.main(["--quick", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    out = capsys.readouterr().out
    assert "tok/s b32" in out and "noisy" in out
    variants = metrics["variants"]
    assert list(variants) == ["MHA", "GQA", "MQA"]
    n = metrics["eval_problems"]
    for r in variants.values():
        assert math.isfinite(r["loss"]) and math.isfinite(r["answer_loss"])
        assert 0 <= r["correct"] <= n and r["accuracy"] == r["correct"] / n
        assert abs(r["parameters"] - variants["MHA"]["parameters"]) / variants["MHA"]["parameters"] < 0.005
        assert sorted(r["decode"]) == ["1", "32", "8"]
        assert all(math.isfinite(s["tokens_per_s"]) and s["tokens_per_s"] > 0 for s in r["decode"].values())
        assert all(len(s["seconds"]) == metrics["sizes"]["rounds"] for s in r["decode"].values())
    kv = [r["kv_bytes_per_token"] for r in variants.values()]
    assert kv[0] > kv[1] > kv[2]
    assert [r["kv_heads"] for r in variants.values()] == [4, 2, 1]
    assert (tmp_path / "gqa_ablation.png").exists() == (importlib.util.find_spec("matplotlib") is not None)

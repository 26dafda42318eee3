"""The doors a transformers user knocks on: Auto classes, remote code, Hub Llama checkpoints, pipeline, PEFT,
device maps, and the reward head."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_llama2 import Llama2Config, Llama2ForCausalLM, Llama2ForSequenceClassification, Llama2Model

from .conftest import HIDE_PACKAGE, TINY, tiny_config


def test_auto_classes_build_our_models():
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("llama2", **TINY), Llama2Config)
    assert type(AutoModel.from_config(config)) is Llama2Model
    assert type(AutoModelForCausalLM.from_config(config)) is Llama2ForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is Llama2ForSequenceClassification


def test_save_and_load_through_auto_classes(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is Llama2ForCausalLM
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, tiny_model(input_ids).logits, atol=0, rtol=0)


REMOTE_SCRIPT = HIDE_PACKAGE + textwrap.dedent(
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path, inputs = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    assert type(model).__name__ == "Llama2ForCausalLM", type(model)
    assert model.config.model_type == "llama2"
    input_ids = torch.load(inputs)
    with torch.no_grad():
        logits = model(input_ids).logits
        tokens = model.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    head = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True, num_labels=1)
    assert type(head).__name__ == "Llama2ForSequenceClassification", type(head)

    # Each saves again where the package is missing, and the copy loads again (with remote code) to the same outputs.
    AutoConfig.from_pretrained(path, trust_remote_code=True).save_pretrained(path + "-config")
    assert AutoConfig.from_pretrained(path + "-config", trust_remote_code=True).hidden_size == model.config.hidden_size
    merged = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).merge_and_unload()
    for name, saved, auto in [("lm", model, AutoModelForCausalLM), ("merged", merged, AutoModelForCausalLM),
                              ("head", head, AutoModelForSequenceClassification)]:
        saved.save_pretrained(path + "-" + name)
        again = auto.from_pretrained(path + "-" + name, trust_remote_code=True)
        assert type(again).__name__ == type(saved).__name__, (name, type(again))
        # The weights come back bit-exact; the outputs only to fp32 rounding, because a loaded tensor sits at its
        # file's offset and a matrix product's summation order follows the operand's alignment.
        assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.state_dict().items()), name
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids).logits, saved(input_ids).logits, atol=1e-6, rtol=0)
    torch.save({"logits": logits, "tokens": tokens}, inputs + ".out")
    """
)


def test_trust_remote_code_without_the_package(tmp_path, tiny_model):
    model_dir = tmp_path / "checkpoint"
    tiny_model.save_pretrained(model_dir)
    for name in ("configuration_llama2.py", "modeling_llama2.py"):
        assert (model_dir / name).is_file()
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 10))
    torch.save(input_ids, tmp_path / "inputs.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [sys.executable, str(script), str(model_dir), str(tmp_path / "inputs.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "inputs.pt.out")
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], tiny_model(input_ids).logits, atol=1e-6, rtol=0)
        local_tokens = tiny_model.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(remote["tokens"], local_tokens)


def test_hub_llama_checkpoint_loads_into_llama2(tmp_path):
    """A `LlamaForCausalLM` directory as on the Hub (`model_type: "llama"`, legacy `rope_theta` key)."""
    torch.manual_seed(0)
    reference = LlamaForCausalLM(
        LlamaConfig(**{**TINY, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    )
    reference.eval().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=10000.0, rope_scaling=None, architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as log:
        ours = Llama2ForCausalLM.from_pretrained(tmp_path)
    assert "model of type" not in log.out  # the weights are the same: no warning about the model type
    assert isinstance(ours.config, Llama2Config)
    assert ours.config.rope_parameters["rope_theta"] == 10000.0
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, reference(input_ids).logits, atol=1e-5, rtol=0)

    # A Hub Llama fine-tuned with this package stays a Hub Llama: stock type and class names, no custom code.
    ours.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again/config.json").read_text())
    assert (saved["model_type"], saved["architectures"], saved["rope_theta"]) == ("llama", ["LlamaForCausalLM"], 1e4)
    assert "auto_map" not in saved and not list((tmp_path / "again").glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert type(stock) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids).logits, reference(input_ids).logits, atol=0, rtol=0)


def test_other_model_types_are_refused(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 4096}))
    with pytest.raises(ValueError, match="holds a 'mistral' model; Llama2Config reads Llama checkpoints"):
        Llama2Config.from_pretrained(tmp_path)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over a small alphabet: enough for `pipeline` without a trained model."""
    alphabet = list("abcdefghijklmnopqrstuvwxyz ,.?!")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def test_text_generation_pipeline(tmp_path):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config(vocab_size=len(tokenizer), pad_token_id=0)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    assert type(generator.model) is Llama2ForCausalLM
    out = generator("hello there", max_new_tokens=8, do_sample=False, return_full_text=False)
    expected_ids = model.generate(
        tokenizer("hello there", return_tensors="pt").input_ids, max_new_tokens=8, do_sample=False
    )[0, len("hello there") :]
    assert out[0]["generated_text"] == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert len(out[0]["generated_text"]) > 0


def test_device_map_auto_splits_between_whole_layers(tmp_path):
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config(num_hidden_layers=4)).eval()
    model.save_pretrained(tmp_path)
    # A memory budget of about a third of the weights forces a split between the CPU and the disk.
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map="auto", max_memory={"cpu": 400_000}, offload_folder=tmp_path / "offload"
    )
    placements = loaded.hf_device_map
    assert set(placements.values()) == {"cpu", "disk"}
    # `_no_split_modules`: a decoder layer is never cut in two.
    assert all(name.count(".") <= 2 for name in placements), placements
    input_ids = torch.randint(1, TINY["vocab_size"], (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, atol=1e-6, rtol=0)


def test_reward_head_scores_the_last_real_token_under_any_padding():
    torch.manual_seed(0)
    # pad == eos, as Llama 2 checkpoints are commonly set up: the mask, not the pad id, must decide.
    model = Llama2ForSequenceClassification(tiny_config(num_labels=1, pad_token_id=2)).eval()
    sequences = [[1, 5, 6, 7, 2], [1, 9, 10, 2], [1, 11, 12, 13, 14, 15, 2]]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s]), attention_mask=torch.ones(1, len(s))).logits for s in sequences])
        width = max(map(len, sequences))
        for side in ("left", "right"):
            input_ids = torch.full((3, width), 2)
            mask = torch.zeros(3, width, dtype=torch.long)
            for row, s in enumerate(sequences):
                cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
                input_ids[row, cols], mask[row, cols] = torch.tensor(s), 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            scores = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
            assert scores.shape == (3, 1)
            torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


def test_reward_head_falls_back_to_pad_token_id():
    torch.manual_seed(0)
    model = Llama2ForSequenceClassification(tiny_config(num_labels=1, pad_token_id=0)).eval()
    with torch.no_grad():
        alone = model(torch.tensor([[1, 5, 6]])).logits
        right_padded = model(torch.tensor([[1, 5, 6, 0, 0], [1, 7, 8, 9, 10]])).logits
    torch.testing.assert_close(right_padded[:1], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention_mask"):
        Llama2ForSequenceClassification(tiny_config(num_labels=1, pad_token_id=None))(
            torch.ones(2, 3, dtype=torch.long)
        )


peft = pytest.importorskip("peft")


def test_lora_trains_only_adapters_and_round_trips(tmp_path, tiny_model):
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(1, TINY["vocab_size"], (2, 12))
    model.train()
    for _ in range(3):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable

    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    fresh_base = Llama2ForCausalLM(tiny_config()).eval()  # same seed as the fixture: the same base weights
    reloaded = peft.PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted, atol=1e-6, rtol=0)
        merged = reloaded.merge_and_unload()
        assert type(merged) is Llama2ForCausalLM
        torch.testing.assert_close(merged(input_ids).logits, adapted, atol=1e-5, rtol=0)

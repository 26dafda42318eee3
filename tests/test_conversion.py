"""`llama2-convert`: Meta shards and llama2.c checkpoints to Hugging Face and back, and its error paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import modeling_llama2
from llama2_convert.__main__ import main

from .conftest import HIDE_PACKAGE
from .llama2_reference import (
    hidden_dim,
    meta_forward,
    meta_shards,
    random_state,
    train_sentencepiece,
    write_llama2c_bin,
    write_meta_checkpoint,
)

MHA = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": 96}
GQA = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 2,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-6,
    "vocab_size": 96,
}
GQA8 = {
    "dim": 128,
    "n_layers": 2,
    "n_heads": 16,
    "n_kv_heads": 8,
    "multiple_of": 64,
    "norm_eps": 1e-5,
    "rope_theta": 1e6,
    "vocab_size": 128,
}
CASES = {"mha-1-shard": (MHA, 1), "gqa-2-shards-ffn-multiplier": (GQA, 2), "gqa-8-shards-rope-theta": (GQA8, 8)}


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer")


def convert(*args) -> int:
    return main([str(a) for a in args])


def to_meta(source: Path, output: Path, num_shards: int, *options) -> int:
    return convert("hf-to-meta", "--input-dir", source, "--output-dir", output, "--num-shards", num_shards, *options)


def load_hf(folder: Path):
    """This package's model, which loads both output formats."""
    return modeling_llama2.Llama2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_matches_meta(folder: Path, state: dict, params: dict) -> None:
    tokens = torch.randint(0, params["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = load_hf(folder)(tokens).logits
    torch.testing.assert_close(logits, meta_forward(state, params, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params, num_shards", CASES.values(), ids=CASES.keys())
def test_meta_to_hf_matches_meta_forward_and_round_trips_bit_exact(tmp_path, params, num_shards, capsys):
    state = random_state(params, params["vocab_size"])
    shards = meta_shards(state, num_shards)
    source = write_meta_checkpoint(tmp_path / "llama-2-tiny", params, shards)

    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf", "--dtype", "float32") == 0
    assert "Writing safetensors" in capsys.readouterr().err  # the per-tensor progress bar
    assert_matches_meta(tmp_path / "hf", state, params)
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.intermediate_size == hidden_dim(params)
    assert config.rms_norm_eps == params["norm_eps"]
    assert config.rope_parameters["rope_theta"] == params.get("rope_theta", 10000.0)
    assert config.max_position_embeddings == 4096
    # By default a stock transformers Llama checkpoint: stock type and class, no custom code, both RoPE spellings.
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == params.get("rope_theta", 10000.0)
    assert "auto_map" not in written and not list((tmp_path / "hf").glob("*.py"))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(stock) is LlamaForCausalLM
    tokens = torch.randint(0, params["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(stock(tokens).logits, meta_forward(state, params, tokens), rtol=1e-5, atol=1e-5)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert "max_length" not in generation

    assert to_meta(tmp_path / "hf", tmp_path / "back", num_shards, "--no-tokenizer") == 0
    for rank, shard in enumerate(shards):
        back = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert back.keys() == shard.keys() - {"rope.freqs"}
        for name, tensor in back.items():
            assert tensor.dtype == shard[name].dtype and torch.equal(tensor, shard[name]), name
    back_params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert hidden_dim(back_params) == hidden_dim(params)
    assert {k: back_params.get(k) for k in ("dim", "n_layers", "n_heads", "norm_eps", "rope_theta")} == {
        k: params.get(k) for k in ("dim", "n_layers", "n_heads", "norm_eps", "rope_theta")
    }
    # The written checklist.chk verifies: the Meta folder converts again.
    assert (
        convert(
            "meta-to-hf", "--input-dir", tmp_path / "back", "--output-dir", tmp_path / "again", "--dtype", "float32"
        )
        == 0
    )


def test_stored_dtype_kept_and_round_trip_bit_exact_across_shard_counts(tmp_path):
    """Meta ships bfloat16; without --dtype nothing is rounded, and 2 shards re-split into 1 and back."""
    state = random_state(GQA, GQA["vocab_size"], dtype=torch.bfloat16)
    source = write_meta_checkpoint(tmp_path / "bf16", GQA, meta_shards(state, 2))
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 0
    assert AutoConfig.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
    assert to_meta(tmp_path / "hf", tmp_path / "one", 1, "--no-tokenizer") == 0
    assert convert("meta-to-hf", "--input-dir", tmp_path / "one", "--output-dir", tmp_path / "hf1") == 0
    assert to_meta(tmp_path / "hf1", tmp_path / "two", 2, "--no-tokenizer") == 0
    for rank, shard in enumerate(meta_shards(state, 2)):
        back = torch.load(tmp_path / "two" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert all(back[name].dtype == torch.bfloat16 and torch.equal(back[name], shard[name]) for name in back)


def test_sharded_safetensors_index_and_dtype(tmp_path):
    params = MHA
    state = random_state(params, params["vocab_size"])
    source = write_meta_checkpoint(tmp_path / "m", params, meta_shards(state, 1))
    options = ("--dtype", "bfloat16", "--max-shard-size", "40KB")
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf", *options) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    total = 0
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "hf" / file, "pt") as f:
            tensor = f.get_tensor(name)
        assert tensor.dtype == torch.bfloat16
        total += tensor.numel() * 2
    assert index["metadata"]["total_size"] == total
    for file in files:  # no file over the limit unless one tensor alone is
        with safe_open(tmp_path / "hf" / file, "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        assert len(sizes) == 1 or sum(torch.Size(s).numel() * 2 for s in sizes) <= 40_000
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16
    torch.testing.assert_close(
        model.model.embed_tokens.weight, state["tok_embeddings.weight"].bfloat16(), rtol=0, atol=0
    )


def test_tokenizer_vocab_size_and_chat_template(tmp_path, sp_model):
    """vocab_size -1 takes the tokenizer's size from tokenizer.model one folder up, as Meta's download lays it out."""
    vocab = 400
    params = MHA | {"vocab_size": -1}
    state = random_state(params, vocab)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    chat = write_meta_checkpoint(tmp_path / "llama-2-7b-chat", params, meta_shards(state, 1))
    assert convert("meta-to-hf", "--input-dir", chat, "--output-dir", tmp_path / "hf-chat", "--dtype", "float32") == 0
    assert_matches_meta(tmp_path / "hf-chat", state, params | {"vocab_size": vocab})
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf-chat")
    assert "[INST]" in tokenizer.chat_template and (tmp_path / "hf-chat" / "tokenizer.model").exists()
    assert len(tokenizer) == vocab and tokenizer("llama").input_ids[0] == tokenizer.bos_token_id == 1

    base = write_meta_checkpoint(tmp_path / "llama-2-7b", params, meta_shards(state, 1))
    tokenizer_option = ("--tokenizer", sp_model)
    assert convert("meta-to-hf", "--input-dir", base, "--output-dir", tmp_path / "hf-base", *tokenizer_option) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf-base").chat_template is None
    forced = ("--chat", "--max-position-embeddings", 16384)
    assert convert("meta-to-hf", "--input-dir", base, "--output-dir", tmp_path / "hf-forced", *forced) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf-forced").chat_template is not None
    assert AutoConfig.from_pretrained(tmp_path / "hf-forced").max_position_embeddings == 16384


def test_cli_entry_point_with_underscore_options(tmp_path):
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    root = Path(__file__).parents[1]
    command = ["meta-to-hf", "--input_dir", source, "--output_dir", tmp_path / "hf", "--max_shard_size", "5GB"]
    env = os.environ | {"PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-m", "llama2_convert", *command], capture_output=True, text=True, cwd=root, env=env
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert load_hf(tmp_path / "hf").config.vocab_size == 96


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def corrupt(name):
    """Mutations of a valid 2-shard GQA checkpoint in `folder`, each a way a download goes wrong."""

    def mutate(folder: Path) -> None:
        shard = lambda rank: folder / f"consolidated.{rank:02d}.pth"  # noqa: E731
        edit = lambda rank, f: torch.save(f(torch.load(shard(rank), weights_only=True)), shard(rank))  # noqa: E731
        if name == "no-params":
            (folder / "params.json").unlink()
        elif name == "no-shards":
            for rank in range(2):
                shard(rank).unlink()
        elif name == "shard-gap":
            shard(1).rename(folder / "consolidated.02.pth")
        elif name == "missing-key":
            edit(1, lambda s: {k: v for k, v in s.items() if k != "layers.1.feed_forward.w2.weight"})
        elif name == "extra-key":
            edit(0, lambda s: s | {"layers.2.attention.wq.weight": torch.zeros(1)})
        elif name == "wrong-shape":
            edit(1, lambda s: s | {"layers.0.attention.wk.weight": torch.zeros(16, 64)})
        elif name == "norms-disagree":
            edit(1, lambda s: s | {"layers.1.ffn_norm.weight": torch.zeros(64)})
        elif name == "params-mismatch":
            (folder / "params.json").write_text(json.dumps(GQA | {"n_kv_heads": 4}))
        elif name == "vocab-from-missing-tokenizer":
            (folder / "params.json").write_text(json.dumps(GQA | {"vocab_size": -1}))
        elif name == "malicious-pickle":
            torch.save({"layers.0.ffn_norm.weight": Evil()}, shard(1))  # loading it unpickled would run a command
        (folder / "checklist.chk").unlink()  # so that the checksum does not catch it first

    return mutate


ERRORS = {
    "no-params": "params.json not found",
    "no-shards": "consolidated.00.pth",
    "shard-gap": "without gaps",
    "missing-key": "consolidated.01.pth lacks layers.1.feed_forward.w2.weight",
    "extra-key": "unexpected tensors layers.2.attention.wq.weight",
    "wrong-shape": "layers.0.attention.wk.weight has shape (16, 64)",
    "norms-disagree": "layers.1.ffn_norm.weight differs between consolidated.00.pth and consolidated.01.pth",
    "params-mismatch": "belong to different models",
    "vocab-from-missing-tokenizer": "pass --tokenizer",
    "malicious-pickle": "tensors-only",
}


@pytest.mark.parametrize("name", ERRORS)
def test_meta_to_hf_errors_leave_no_output(tmp_path, name, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = write_meta_checkpoint(tmp_path / "in" / "m", GQA, meta_shards(random_state(GQA, 96), 2))
    corrupt(name)(source)
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "out" / "hf") == 2
    assert ERRORS[name] in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any(
        (tmp_path / "out").iterdir()
    )  # nothing half-written, no temp folder
    assert not (tmp_path / "pwned").exists()


def test_checksum_mismatch_and_skip_checksum(tmp_path, capsys):
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    torch.save(meta_shards(random_state(MHA, 96, seed=5), 1)[0], source / "consolidated.00.pth")
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 2
    assert "consolidated.00.pth does not match its md5 sum" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf", "--skip-checksum") == 0
    with open(source / "checklist.chk", "a") as f:  # a download that lost its second shard
        f.write("d41d8cd98f00b204e9800998ecf8427e  consolidated.01.pth\n")
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf2") == 2
    assert "checklist.chk lists consolidated.01.pth, which is not in" in capsys.readouterr().err


def test_refuses_non_empty_output_unless_overwrite(tmp_path, capsys):
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("precious")
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "hf" / "keep.txt").exists()
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf", "--overwrite") == 0
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m"]  # no staging or old folder left behind


def test_hf_to_meta_rejects_indivisible_shard_count(tmp_path, capsys):
    source = write_meta_checkpoint(tmp_path / "m", GQA, meta_shards(random_state(GQA, 96), 1))
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 0
    assert to_meta(tmp_path / "hf", tmp_path / "back", 3, "--no-tokenizer") == 2
    assert "cannot be split into 3 equal shards" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


LLAMA2C = {
    "dim": 48,
    "n_layers": 2,
    "n_heads": 6,
    "n_kv_heads": 3,
    "multiple_of": 32,
    "norm_eps": 1e-5,
    "vocab_size": 80,
}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama2c_training_checkpoint(tmp_path, tied):
    state = random_state(LLAMA2C, 80)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model_args = {
        "dim": 48,
        "n_layers": 2,
        "n_heads": 6,
        "n_kv_heads": 3,
        "vocab_size": 80,
        "multiple_of": 32,
        "max_seq_len": 64,
        "dropout": 0.0,
    }
    compiled = {
        f"_orig_mod.{name}": tensor for name, tensor in state.items()
    }  # train.py saves the torch.compile'd module
    torch.save(
        {
            "model": compiled,
            "model_args": model_args,
            "iter_num": 10,
            "best_val_loss": 1.5,
            "config": {"batch_size": 8},
        },
        tmp_path / "ckpt.pt",
    )
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "hf") == 0
    assert_matches_meta(tmp_path / "hf", state, LLAMA2C)
    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.tie_word_embeddings == tied and config.max_position_embeddings == 64


@pytest.mark.parametrize("version, tied", [(0, True), (0, False), (1, True), (1, False)])
def test_llama2c_bin_export(tmp_path, version, tied, sp_model):
    state = random_state(LLAMA2C | {"vocab_size": 400}, 400)
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    write_llama2c_bin(tmp_path / "model.bin", LLAMA2C, state, version=version, seq_len=32)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "model.bin", "--output-dir", tmp_path / "hf") == 0
    assert_matches_meta(tmp_path / "hf", state, LLAMA2C | {"vocab_size": 400})
    assert AutoConfig.from_pretrained(tmp_path / "hf").max_position_embeddings == 32
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_llama2c_rejects_other_versions_and_truncation(tmp_path, capsys):
    state = random_state(LLAMA2C, 80)
    write_llama2c_bin(tmp_path / "model.bin", LLAMA2C, state, version=2, seq_len=32)
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "model.bin", "--output-dir", tmp_path / "hf") == 2
    assert "version 2" in capsys.readouterr().err
    write_llama2c_bin(tmp_path / "model.bin", LLAMA2C, state, version=1, seq_len=32)
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:-400])
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "model.bin", "--output-dir", tmp_path / "hf") == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_hf_to_meta_errors(tmp_path, capsys):
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    assert convert("hf-to-meta", "--input-dir", source, "--output-dir", tmp_path / "back", "--num-shards", 1) == 2
    assert "config.json not found" in capsys.readouterr().err
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 0
    index = tmp_path / "hf" / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())
    del weight_map["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index.write_text(json.dumps(weight_map))
    assert to_meta(tmp_path / "hf", tmp_path / "back", 1, "--no-tokenizer") == 2
    assert "has no tensor model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


def test_model_type_llama2_writes_this_packages_format(tmp_path):
    state = random_state(GQA, GQA["vocab_size"])
    source = write_meta_checkpoint(tmp_path / "m", GQA, meta_shards(state, 1))
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf", "--model-type", "llama2") == 0
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("llama2", ["Llama2ForCausalLM"])
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_llama2.Llama2ForCausalLM"
    assert {"configuration_llama2.py", "modeling_llama2.py"} <= {p.name for p in (tmp_path / "hf").glob("*.py")}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(model) is modeling_llama2.Llama2ForCausalLM
    assert_matches_meta(tmp_path / "hf", state, GQA)


def test_tokenizer_model_carried_through_hf_to_meta(tmp_path, sp_model, capsys):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    params = MHA | {"vocab_size": 400}
    source = write_meta_checkpoint(tmp_path / "m", params, meta_shards(random_state(params, 400), 1))
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 0
    assert to_meta(tmp_path / "hf", tmp_path / "back", 1) == 0
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert convert("meta-to-hf", "--input-dir", tmp_path / "back", "--output-dir", tmp_path / "again") == 0
    text = "the llama  café 12 345"
    assert AutoTokenizer.from_pretrained(tmp_path / "again")(text).input_ids == AutoTokenizer.from_pretrained(
        tmp_path / "hf"
    )(text).input_ids

    # A trainer's folder as other tools write it: tokenizer.json, no tokenizer.model to give back.
    (tmp_path / "hf" / "tokenizer.model").unlink()
    capsys.readouterr()
    assert to_meta(tmp_path / "hf", tmp_path / "lost", 1) == 2
    error = capsys.readouterr().err
    assert "tokenizer.model not found" in error and "--no-tokenizer" in error and not (tmp_path / "lost").exists()
    assert to_meta(tmp_path / "hf", tmp_path / "lost", 1, "--tokenizer", sp_model) == 0
    assert (tmp_path / "lost" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert to_meta(tmp_path / "hf", tmp_path / "weights", 1, "--no-tokenizer") == 0
    assert not (tmp_path / "weights" / "tokenizer.model").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_the_users_umask(tmp_path, sp_model, umask):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    params = MHA | {"vocab_size": 400}
    source = write_meta_checkpoint(tmp_path / "m", params, meta_shards(random_state(params, 400), 1))
    old = os.umask(umask)
    try:
        assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "hf") == 0
        assert to_meta(tmp_path / "hf", tmp_path / "back", 1) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "hf", tmp_path / "back"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
        for file in folder.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


STOCK_SCRIPT = HIDE_PACKAGE + """
import logging as logging_std, warnings

warnings.simplefilter("error")  # any warning fails the run
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

class Collect(logging_std.Handler):
    def emit(self, record):
        messages.append(record.getMessage())

messages = []
logging.set_verbosity_warning()
logging.get_logger("transformers").addHandler(Collect())
stock, ours, tokens, out = sys.argv[1:]
assert type(AutoConfig.from_pretrained(stock)).__name__ == "LlamaConfig"
model = AutoModelForCausalLM.from_pretrained(stock, dtype=torch.float32)
assert type(model).__name__ == "LlamaForCausalLM", type(model)
tokenizer = AutoTokenizer.from_pretrained(stock)
remote = AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True, dtype=torch.float32)
assert type(remote).__name__ == "Llama2ForCausalLM", type(remote)
remote.save_pretrained(ours + "-again")
again = AutoModelForCausalLM.from_pretrained(ours + "-again", trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    ids = torch.load(tokens)
    torch.save({"stock": model(ids).logits, "remote": again(ids).logits, "text": tokenizer("the llama").input_ids,
                "messages": messages}, out)
"""


def test_outputs_load_where_the_package_is_not_installed(tmp_path, sp_model):
    """Stock transformers reads the default output with no warning; the llama2 output loads as remote code, saves
    and loads again."""
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    params = GQA | {"vocab_size": 400}
    state = random_state(params, 400)
    source = write_meta_checkpoint(tmp_path / "m", params, meta_shards(state, 1))
    assert convert("meta-to-hf", "--input-dir", source, "--output-dir", tmp_path / "stock", "--dtype", "float32") == 0
    ours = ("--output-dir", tmp_path / "ours", "--model-type", "llama2", "--dtype", "float32")
    assert convert("meta-to-hf", "--input-dir", source, *ours) == 0
    tokens = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "stock.py").write_text(STOCK_SCRIPT)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run(
        [sys.executable, str(tmp_path / "stock.py"), *(str(tmp_path / name) for name in ("stock", "ours")),
         str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert not [m for m in out["messages"] if "model of type" in m or "custom code" in m], out["messages"]
    reference = meta_forward(state, params, tokens)
    torch.testing.assert_close(out["stock"], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["remote"], reference, rtol=1e-5, atol=1e-5)
    assert out["text"] == AutoTokenizer.from_pretrained(tmp_path / "stock")("the llama").input_ids

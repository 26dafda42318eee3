"""The trainers' data through `datasets` (files of any format, `Dataset` objects, streaming), their console scripts,
launches that would not be distributed, and the quiet defaults."""

import functools
import gzip
import importlib.util
import json
import logging
import os
import subprocess
import sys

import datasets
import pyarrow.feather
import pytest
import torch
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from transformers import TrainingArguments

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.alignment.data import prepare
from modeling_llama2.alignment.reward import load_reward_base
from modeling_llama2.alignment.sft import SFTArguments, encode_sample, pack_stream, run_sft
from modeling_llama2.alignment.training import InputError, ModelArguments, parse_args
from tests.alignment_helpers import (
    REPO,
    alignment_config,
    logged_losses,
    qa_pairs,
    run_script,
    save_causal_lm,
    script_error,
    write_jsonl,
)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("model") / "model")


def records(n):
    return [{"prompt": q, "response": a} for q, a in qa_pairs(n)]


def short_run(output_dir, **overrides):
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding", **overrides,
    )  # fmt: skip


@pytest.mark.parametrize("form", ["parquet", "jsonl.gz", "Dataset"])
def test_sft_trains_from_parquet_gzipped_jsonl_and_a_dataset(tmp_path, model_dir, form, recwarn):
    data = datasets.Dataset.from_list(records(8))
    kwargs, sft_args = {}, SFTArguments(max_length=128)
    if form == "parquet":
        data.to_parquet(tmp_path / "sft.parquet")
        sft_args.train_file = str(tmp_path / "sft.parquet")
    elif form == "jsonl.gz":
        with gzip.open(tmp_path / "sft.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in records(8))
        sft_args.dataset = str(tmp_path / "sft.jsonl.gz")
    else:
        kwargs = {"train_dataset": data, "eval_dataset": data.select(range(2))}
    args = short_run(tmp_path / "out")
    metrics = run_sft(ModelArguments(model=str(model_dir)), sft_args, args, **kwargs)
    assert len(logged_losses(tmp_path / "out")) == 2 and metrics["train_useful_tokens_per_second"] > 0
    assert ("eval_loss" in metrics) == (form == "Dataset")
    assert args.dataloader_pin_memory is False and not [w for w in recwarn if "pin_memory" in str(w.message)]


def test_eval_size_holds_out_records(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "sft.jsonl", records(10))
    sft_args = SFTArguments(train_file=str(data), max_length=128, eval_size=3)
    metrics = run_sft(ModelArguments(model=str(model_dir)), sft_args, short_run(tmp_path / "out"))
    assert metrics["eval_samples_per_second"] > 0


def sample_ids(tokenizer, *, train_dataset=None, **data_args) -> tuple[list, list | None]:
    """The training and evaluation samples' token ids that `prepare` gives for these `SFTArguments`."""
    encode = functools.partial(encode_sample, tokenizer=tokenizer, max_length=128, context=None)
    (train, _), evaluation = prepare(
        SFTArguments(max_length=128, **data_args), encode, seed=0, desc="Tokenizing", train_dataset=train_dataset
    )
    return [s["input_ids"] for s in train], evaluation and [s["input_ids"] for s in evaluation[0]]


def hub_layout(folder, parts: dict[str, list[dict]]):
    """A folder laid out as a Hub data set repository: `data/{split}-00000-of-00001.parquet` for each split."""
    (folder / "data").mkdir(parents=True)
    for split, rows in parts.items():
        datasets.Dataset.from_list(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


@pytest.mark.parametrize("form", ["csv", "arrow", "save_to_disk", "save_to_disk dict", "hub layout"])
@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_reads_csv_arrow_saved_folders_and_hub_layouts(tmp_path, tokenizer, form, streaming):
    data = datasets.Dataset.from_list(records(6))
    if form == "csv":
        data.to_csv(tmp_path / "sft.csv", index=False)
        path = tmp_path / "sft.csv"
    elif form == "arrow":  # an Arrow IPC file, as `pyarrow.feather` writes it
        pyarrow.feather.write_feather(data.data.table, tmp_path / "sft.arrow")
        path = tmp_path / "sft.arrow"
    elif form == "save_to_disk":
        data.save_to_disk(path := tmp_path / "saved")
    elif form == "save_to_disk dict":
        datasets.DatasetDict(train=data, test=datasets.Dataset.from_list(records(8)[6:])).save_to_disk(
            path := tmp_path / "saved"
        )
    else:
        path = hub_layout(tmp_path / "repo", {"train": records(6), "test": records(8)[6:]})
    train, _ = sample_ids(tokenizer, dataset=str(path), streaming=streaming)
    assert train == sample_ids(tokenizer, train_dataset=data)[0]
    if form in ("save_to_disk dict", "hub layout"):
        _, evaluation = sample_ids(tokenizer, dataset=str(path), eval_split="test", streaming=streaming)
        assert evaluation == sample_ids(tokenizer, train_dataset=datasets.Dataset.from_list(records(8)[6:]))[0]
        test, _ = sample_ids(tokenizer, dataset=str(path), train_split="test", streaming=streaming)
        assert test == evaluation


def test_dataset_config_chooses_a_configuration_declared_in_the_readme(tmp_path, tokenizer):
    """A folder (or Hub repository) whose README.md declares `configs:`, each with its splits' files."""
    for name, rows in (("small", records(3)), ("big", records(7))):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "train.jsonl", rows)
        write_jsonl(tmp_path / name / "test.jsonl", records(9)[7:])
    configs = "".join(
        f"- config_name: {name}\n{'  default: true' + chr(10) if name == 'big' else ''}  data_files:\n"
        + "".join(f"  - split: {split}\n    path: {name}/{split}.jsonl\n" for split in ("train", "test"))
        for name in ("small", "big")
    )
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# SFT data\n")
    ids = lambda n: sample_ids(tokenizer, train_dataset=datasets.Dataset.from_list(records(n)))[0]  # noqa: E731
    assert sample_ids(tokenizer, dataset=str(tmp_path), dataset_config="small")[0] == ids(3)
    assert sample_ids(tokenizer, dataset=str(tmp_path))[0] == ids(7)  # the default configuration
    _, evaluation = sample_ids(tokenizer, dataset=str(tmp_path), dataset_config="small", eval_split="test")
    assert evaluation == ids(9)[7:]
    with pytest.raises(InputError, match=r"cannot be loaded \(BuilderConfig 'tiny' not found. Available: \['small'"):
        sample_ids(tokenizer, dataset=str(tmp_path), dataset_config="tiny")


def test_eval_size_holds_out_a_fraction_or_a_count(tokenizer):
    data = datasets.Dataset.from_list(records(10))
    everything = sample_ids(tokenizer, train_dataset=data)[0]
    for size, held_out in ((0.3, 3), (4, 4)):
        kept, evaluation = sample_ids(tokenizer, train_dataset=data, eval_size=size)
        assert len(evaluation) == held_out and sorted(kept + evaluation) == sorted(everything)
    kept, evaluation = sample_ids(tokenizer, train_dataset=data.to_iterable_dataset(), eval_size=4, streaming=True)
    assert evaluation == everything[:4] and kept == everything[4:]  # a stream's first records


@pytest.mark.parametrize(
    "data_args, message",
    [
        ({"eval_size": 0.0}, r"--eval-size must be a fraction in \(0, 1\) or a whole number of records, got 0.0"),
        ({"eval_size": 2.5}, r"--eval-size must be a fraction in \(0, 1\) or a whole number of records, got 2.5"),
        ({"eval_size": 11}, r"--eval-size 11: test_size=11 should be either positive and smaller than"),
        ({"eval_size": 0.5, "streaming": True}, r"with --streaming, --eval-size must be a number of records"),
        ({"eval_size": 2, "eval_file": "x.jsonl"}, r"give at most one of --eval-file and --eval-size"),
        ({"eval_split": "test", "train_file": "SFT"}, r"--eval-split names a split of --dataset"),
        ({"train_split": "test", "train_file": "SFT"}, r"--train-split and --dataset-config choose within --dataset"),
        ({"dataset_config": "small", "dataset": "SFT"}, r"sft.jsonl is one file, with no configurations"),
        ({"eval_split": "test", "dataset": "SFT"}, r"sft.jsonl is one file, the split 'train' alone, with no split"),
        ({"eval_split": "test", "dataset": "SAVED"}, r"saved holds one Dataset, the split 'train' alone"),
        ({"dataset_config": "x", "dataset": "SAVED"}, r"saved is a `save_to_disk` folder, with no configurations"),
        ({"eval_split": "dev", "dataset": "SAVED_DICT"}, r"saved_dict has no split 'dev'; it has \['train', 'test'\]"),
        ({"eval_split": "dev", "dataset": "REPO"}, r"repo: cannot be loaded \(Unknown split \"dev\". Should be one of"),
    ],
)
def test_data_arguments_that_cannot_hold_are_one_line(tmp_path, tokenizer, data_args, message):
    """Each would otherwise train or evaluate on other data than was asked for, or fail deep inside datasets."""
    saved = datasets.Dataset.from_list(records(4))
    saved.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict(train=saved, test=saved).save_to_disk(tmp_path / "saved_dict")
    places = {"SFT": write_jsonl(tmp_path / "sft.jsonl", records(10)), "REPO": hub_layout(tmp_path / "repo", {
        "train": records(4)}), "SAVED": tmp_path / "saved", "SAVED_DICT": tmp_path / "saved_dict"}  # fmt: skip
    data_args = {key: str(places[value]) if value in places else value for key, value in data_args.items()}
    given = {}
    if "dataset" not in data_args and "train_file" not in data_args:
        given["train_dataset"] = datasets.Dataset.from_list(records(10))
        if data_args.get("streaming"):
            given["train_dataset"] = given["train_dataset"].to_iterable_dataset()
    with pytest.raises(InputError, match=message):
        sample_ids(tokenizer, **given, **data_args)


def test_the_command_line_trains_on_a_configuration_and_evaluates_on_a_split(tmp_path, model_dir):
    hub_layout(tmp_path / "repo", {"train": records(8), "validation": records(10)[8:]})
    out = tmp_path / "out"
    run_script(
        "sft.py", "--model", model_dir, "--dataset", tmp_path / "repo", "--train-split", "train", "--eval-split",
        "validation", "--max-steps", "2", "--max-length", "128", "--output-dir", out, "--use-cpu", "--save-strategy",
        "no", "--report-to", "none",
    )  # fmt: skip
    assert "eval_loss" in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", \n', r"sft.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "response": "b"}\n[1, 2]\n', r"sft.jsonl:2: a JSON list where a record belongs"),
        ("", r"sft.jsonl holds no records"),
    ],
)
def test_a_bad_file_is_one_line_with_its_line(tmp_path, model_dir, capsys, content, message):
    (tmp_path / "sft.jsonl").write_text(content)
    line = script_error(
        "sft.py", "--model", model_dir, "--train-file", tmp_path / "sft.jsonl", "--output-dir", tmp_path / "out",
        "--use-cpu", capsys=capsys,
    )  # fmt: skip
    assert __import__("re").search(message, line), line


def test_a_json_array_file_is_read_as_records(tmp_path, model_dir):
    (tmp_path / "sft.json").write_text(json.dumps(records(4)))
    run_sft(ModelArguments(model=str(model_dir)), SFTArguments(train_file=str(tmp_path / "sft.json"), max_length=128),
            short_run(tmp_path / "out"))  # fmt: skip


def test_pack_stream_keeps_every_sample_once_in_bounded_rows():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6, 1, 10] * 20
    rows = list(pack_stream(({"input_ids": [i] * n} for i, n in enumerate(lengths)), max_length=12, open_rows=3))
    assert sorted(s["input_ids"][0] for row in rows for s in row) == list(range(len(lengths)))
    assert all(sum(len(s["input_ids"]) for s in row) <= 12 for row in rows)
    assert sum(lengths) / (12 * len(rows)) > 0.8  # nearly full rows


def test_streaming_needs_max_steps(tmp_path, model_dir):
    args = short_run(tmp_path / "out")
    args.max_steps = -1
    with pytest.raises(InputError, match="--streaming needs --max-steps"):
        run_sft(ModelArguments(model=str(model_dir)), SFTArguments(train_file="x.jsonl", streaming=True), args)


MEASURE = """
import resource, sys
from modeling_llama2.alignment.sft import main
try:
    main(sys.argv[1:])
finally:
    print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_streaming_memory_does_not_grow_with_the_data(tmp_path, model_dir):
    peaks = {}
    for n in (2_000, 200_000):
        path = tmp_path / f"sft_{n}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps({"prompt": f"the cat {i}?", "response": "red"}) + "\n" for i in range(n))
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, "--model", str(model_dir), "--train-file", str(path), "--streaming",
             "--max-steps", "3", "--max-length", "64", "--output-dir", str(tmp_path / f"out_{n}"), "--use-cpu",
             "--save-strategy", "no", "--report-to", "none"],
            env=ENV, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[n] = int(result.stdout.split("MAXRSS")[-1])
    assert peaks[200_000] < 1.5 * peaks[2_000], peaks


RANKS = """
import json, os, sys
import torch
from transformers import TrainingArguments
import modeling_llama2.alignment.sft as sft
from modeling_llama2.alignment.training import ModelArguments

model, data, log = sys.argv[1:]
encode_sample, collate = sft.encode_sample, sft.PackedCollator.__call__

def encode_and_count(record, **kwargs):  # the same code in every rank, so the same cache fingerprint
    with open(os.path.join(log, "encoded-" + os.environ["RANK"]), "a") as f:
        f.write(record["prompt"] + "\\n")
    return encode_sample(record, **kwargs)

def collate_and_record(self, rows):
    with open(os.path.join(log, f"trained-{RUN}-" + os.environ["RANK"]), "a") as f:
        f.writelines(json.dumps(sample["input_ids"]) + "\\n" for row in rows for sample in row)
    return collate(self, rows)

sft.encode_sample, sft.PackedCollator.__call__ = encode_and_count, collate_and_record
for RUN, streaming in (("mapped", False), ("streamed", True)):
    args = TrainingArguments(
        output_dir=os.path.join(log, RUN), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
        report_to="none", use_cpu=True, remove_unused_columns=False, ddp_backend="gloo",
    )
    data_args = sft.SFTArguments(train_file=data, max_length=64, streaming=streaming)
    sft.run_sft(ModelArguments(model=model), data_args, args)
torch.distributed.destroy_process_group()  # as the scripts' `cli` does: left open, gloo can abort a rank at exit
"""


def test_two_ranks_tokenize_once_and_train_on_distinct_samples(tmp_path, model_dir):
    """Rank 0 tokenizes the data set and caches it, rank 1 loads the cache; with --streaming each rank reads the
    stream and trains on its own share of the packed rows."""
    (tmp_path / "ranks.py").write_text(RANKS)
    records = [{"prompt": f"the cat {i}?", "response": "red"} for i in range(40)]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "ranks.py"), str(model_dir), str(data), str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    prompts = [r["prompt"] for r in records]
    encoded = [(tmp_path / f"encoded-{rank}").read_text().splitlines() for rank in "01"]
    mapped, streamed = encoded[0][: len(records)], encoded[0][len(records) :]
    assert mapped == prompts and streamed and streamed == prompts[: len(streamed)]
    assert encoded[1] and encoded[1] == prompts[: len(encoded[1])]  # rank 1 mapped nothing, then read the stream
    for run in ("mapped", "streamed"):
        trained = [(tmp_path / f"trained-{run}-{rank}").read_text().splitlines() for rank in "01"]
        assert trained[0] and trained[1] and not set(trained[0]) & set(trained[1]), run


def test_console_scripts_show_help_and_train(tmp_path, model_dir):
    helps = subprocess.run(
        "llama2-sft --help && llama2-reward-model --help && llama2-rejection-sampling --help",
        shell=True, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert helps.returncode == 0, helps.stderr[-3000:]
    assert "--no-packing pads each sample" in " ".join(helps.stdout.split())
    assert "--no-compile decodes eagerly" in " ".join(helps.stdout.split())
    out = tmp_path / "out"
    run = subprocess.run(
        ["llama2-sft", "--model", str(model_dir), "--train-file", str(write_jsonl(tmp_path / "sft.jsonl", records(8))),
         "--max-steps", "2", "--max-length", "128", "--output-dir", str(out), "--use-cpu", "--save-strategy", "no"],
        env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_several_ranks_without_use_cpu_are_refused(tmp_path, model_dir):
    """On a CPU machine each rank of torchrun --nproc_per_node 2 without --use-cpu would train alone."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "modeling_llama2.alignment.sft", "--model", str(model_dir), "--train-file", "x.jsonl",
         "--output-dir", str(tmp_path / "out")],
        env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # torchrun stops the other rank once one exits, so it may not get to print its own line
    assert 1 <= len(errors) <= 2 and all(e.startswith("error: launched as 2 processes") for e in errors), result.stderr
    assert "pass --use-cpu" in errors[0] and "exitcode  : 2" in result.stderr


def test_fsdp_on_cpu_is_refused(tmp_path, model_dir, capsys):
    line = script_error(
        "sft.py", "--model", model_dir, "--train-file", "x.jsonl", "--output-dir", tmp_path / "out", "--use-cpu",
        "--fsdp", "full_shard", capsys=capsys,
    )  # fmt: skip
    assert line.startswith("error: FSDP needs GPUs")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("devices, ranks", [(1, 1), (2, 2), (8, 2)])
def test_gpu_check_runs_fsdp_on_two_ranks_where_there_are_two_gpus(monkeypatch, devices, ranks):
    """The launch `gpu_check.py` makes on a GPU machine: its ranks, and a `llama2-sft` command line whose FSDP settings
    accelerate turns into FSDP2 with each decoder layer wrapped (its own policy function, applied to our model)."""
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it; restored after
    gpu_check = load_gpu_check()
    command = gpu_check.fsdp_sft_command(devices, model="M", data="D.jsonl", output_dir="OUT", report_dir="R")
    assert command[command.index("--nproc_per_node") + 1] == str(ranks)
    worker = command.index("--fsdp-worker")
    assert command[worker - 1] == gpu_check.__file__ and command[worker + 1] == "R"
    model_args, sft_args, training_args = parse_args(ModelArguments, SFTArguments, argv=command[worker + 2 :])
    assert (model_args.model, sft_args.train_file, training_args.output_dir) == ("M", "D.jsonl", "OUT")
    plugin = FullyShardedDataParallelPlugin(**training_args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    model = Llama2ForCausalLM(alignment_config(96))
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [name for name, module in model.named_modules() if wrap(module)] == ["model.layers.0", "model.layers.1"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        gpu_check.fsdp_sft_command(0, model="M", data="D.jsonl", output_dir="OUT", report_dir="R")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu_check.py runs its checks")
def test_gpu_check_without_a_gpu_says_so_and_exits(capsys):
    load_gpu_check().main([])
    assert "sees no CUDA device here: nothing to check; run it on a GPU machine." in capsys.readouterr().err


def test_output_dir_is_required(tmp_path, model_dir, capsys):
    from modeling_llama2.alignment.sft import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--train-file", "x.jsonl", "--use-cpu"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --output_dir/--output-dir" in capsys.readouterr().err


def test_a_reward_model_from_a_causal_lm_says_so_in_one_line(model_dir, caplog, capsys):
    with caplog.at_level(logging.INFO):
        load_reward_base(ModelArguments(model=str(model_dir)), "helpfulness", 0)
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out + caplog.text
    (record,) = [r for r in caplog.records if "score.weight" in r.getMessage()]
    assert "a causal LM; the reward head (score.weight) starts from random weights" in record.getMessage()

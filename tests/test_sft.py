import functools
import json
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.alignment.sft import (
    LossOnlyTrainer,
    PackedRows,
    SFTArguments,
    encode_record,
    load_sft_samples,
    pack,
    sft_collator,
)
from modeling_llama2.alignment.training import InputError, ModelArguments, cli, parse_args, whole_run_loss
from modeling_llama2.chat_format import IGNORE_INDEX, encode_dialog, tokenizer_encoder
from tests.alignment_helpers import (
    alignment_config,
    launch_script,
    logged_losses,
    losses_in,
    qa_pairs,
    run_script,
    save_causal_lm,
    script_error,
    write_jsonl,
)


def tiny_lm(tokenizer, attn_implementation="sdpa"):
    torch.manual_seed(0)
    model = Llama2ForCausalLM(alignment_config(len(tokenizer))).eval()
    model.set_attn_implementation(attn_implementation)
    return model


def exchange(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_loss_ignores_prompt_targets_and_follows_response_targets(tokenizer):
    model, encode = tiny_lm(tokenizer), tokenizer_encoder(tokenizer)

    def labels_of(question, answer):
        return torch.tensor([encode_dialog(exchange(question, answer), encode, 1, 2)[1]])

    ids, labels = encode_dialog(exchange("the cat is red. what color?", "the cat is red"), encode, 1, 2)
    other_prompt = labels_of("the dog is red. what color?", "the cat is red")
    other_response = labels_of("the cat is red. what color?", "the dog is red")
    assert other_prompt.shape == other_response.shape == (1, len(ids))  # one-token swaps: same positions

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits

    def loss(labels):
        return model.loss_function(logits, labels, vocab_size=model.config.vocab_size)

    assert torch.equal(loss(other_prompt), loss(torch.tensor([labels])))
    assert not torch.allclose(loss(other_response), loss(torch.tensor([labels])))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_equals_samples_one_by_one(tmp_path, tokenizer, attn_implementation):
    records = [{"prompt": q, "response": a} for q, a in qa_pairs(7)]
    records[2] = {"messages": [{"role": "system", "content": "be brief"}, *exchange(*qa_pairs(1, seed=3)[0])]}
    samples = load_sft_samples(write_jsonl(tmp_path / "sft.jsonl", records), tokenizer, max_length=128)
    rows = [[samples[i] for i in row] for row in pack([len(ids) for ids in samples["input_ids"]], max_length=128)]
    assert len(rows) < len(samples)  # several samples share each row
    batch = sft_collator(tokenizer, packing=True)(rows)
    model = tiny_lm(tokenizer, attn_implementation)
    assert model.config.use_cache  # the default, under which an unmarked packed batch would leak attention

    n_tokens = sum(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (1, n_tokens) and "attention_mask" not in batch  # no padding at all
    with torch.no_grad():
        packed = model(**batch)
        summed, n_targets = 0.0, 0
        for row in rows:
            for s in row:
                out = model(input_ids=torch.tensor([s["input_ids"]]), labels=torch.tensor([s["labels"]]))
                n = sum(label != IGNORE_INDEX for label in s["labels"][1:])
                summed, n_targets = summed + out.loss * n, n_targets + n
        padded = model(**sft_collator(tokenizer, packing=False)(list(samples)))
    torch.testing.assert_close(packed.loss, summed / n_targets, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded.loss, summed / n_targets, rtol=0, atol=1e-5)


def test_sft_trainer_trains_and_evaluates_as_trainer_without_the_logits(tmp_path, tokenizer):
    """`LossOnlyTrainer` asks the model for the loss alone (no logits) in training steps and in a loss-only evaluation,
    and logs the same losses, hence trains the same model, as `Trainer`."""
    records = [{"prompt": q, "response": a} for q, a in qa_pairs(24)]
    samples = load_sft_samples(write_jsonl(tmp_path / "sft.jsonl", records), tokenizer, max_length=64)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2, learning_rate=3e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
        dataloader_pin_memory=False, seed=0,
    )  # fmt: skip

    def run(trainer_class):
        model, logits = tiny_lm(tokenizer).train(), []
        model.register_forward_hook(lambda module, inputs, output: logits.append(output.logits is not None))
        trainer = trainer_class(
            model=model, args=args, train_dataset=PackedRows(samples, 64), eval_dataset=PackedRows(samples, 64),
            data_collator=sft_collator(tokenizer, packing=True),
        )  # fmt: skip
        trainer.train()
        evaluation = trainer.evaluate()["eval_loss"]
        return losses_in(trainer.state.log_history), evaluation, logits, model

    losses, evaluation, logits, model = run(LossOnlyTrainer)
    expected_losses, expected_evaluation, expected_logits, expected_model = run(Trainer)
    assert not any(logits) and all(expected_logits)
    assert losses == pytest.approx(expected_losses, rel=1e-5) and len(losses) == 4
    assert evaluation == pytest.approx(expected_evaluation, rel=1e-5)
    for p, expected in zip(model.parameters(), expected_model.parameters(), strict=True):
        torch.testing.assert_close(p, expected, atol=1e-5, rtol=1e-4)


def test_pack_fills_rows_with_whole_samples():
    lengths = [2, 6, 3, 5, 4]
    rows = pack(lengths, max_length=10)
    assert [sum(lengths[i] for i in row) for row in rows] == [10, 10]
    assert sorted(i for row in rows for i in row) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "the cat"}, 'need "messages"; "prompt" and "completion"; "prompt" and "response"; or "text"'),
        ({"messages": [{"role": "user", "content": "the cat"}]}, "must end with an assistant message"),
        ({"prompt": "the cat " * 40, "response": "red"}, "the prompt alone fills --max-length 32"),
    ],
)
def test_bad_records_are_refused_with_their_line(tmp_path, tokenizer, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, record])
    with pytest.raises(InputError, match=f"bad.jsonl:2: .*{message}"):
        load_sft_samples(str(path), tokenizer, max_length=32)


def test_long_response_is_truncated_to_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "the cat", "response": "red " * 40}])
    (sample,) = load_sft_samples(str(path), tokenizer, max_length=32)
    assert len(sample["input_ids"]) == len(sample["labels"]) == 32


def sft_data(tmp_path, n=48):
    records = [{"prompt": q, "response": a} for q, a in qa_pairs(n)]
    records[0] = {"messages": [{"role": "system", "content": "be brief"}, *exchange(*qa_pairs(1, seed=5)[0])]}
    return write_jsonl(tmp_path / "sft.jsonl", records)


def test_parse_args_reads_a_given_command_line_over_the_script_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sft.py", "--model", "from-sys-argv"])
    argv = ["--model", "m", "--train-file", "t.jsonl", "--output-dir", str(tmp_path), "--num-epochs", "3"]
    model_args, sft_args, training_args = parse_args(
        ModelArguments, SFTArguments, argv=argv, learning_rate=2e-5, num_train_epochs=2
    )
    assert (model_args.model, sft_args.train_file, sft_args.max_length) == ("m", "t.jsonl", 4096)
    assert training_args.num_train_epochs == 3.0  # the command line wins over the script's default
    assert training_args.learning_rate == 2e-5  # the script's default wins over TrainingArguments'
    assert training_args.remove_unused_columns is False


def test_sft_script_trains_and_saves_a_loadable_model(tmp_path):
    model_dir, out = save_causal_lm(tmp_path / "model"), tmp_path / "out"
    data = sft_data(tmp_path)
    run_script(
        "sft.py", "--model", model_dir, "--train-file", data, "--eval-file", data, "--output-dir", out,
        "--max-steps", 24, "--learning-rate", 3e-3, "--per-device-train-batch-size", 2, "--max-length", 128,
        "--logging-steps", 4, "--save-strategy", "no", "--use-cpu",
    )  # fmt: skip
    losses = logged_losses(out)
    assert losses[-1] < losses[0] - 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_useful_tokens_per_second"] > 0 and metrics["eval_loss"] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, Llama2ForCausalLM) and model.config.use_cache


def test_sft_script_lora_checkpoint_resume(tmp_path):
    model_dir, out = save_causal_lm(tmp_path / "model"), tmp_path / "out"
    common = (
        "--model", model_dir, "--train-file", sft_data(tmp_path, n=16), "--output-dir", out, "--lora",
        "--lora-r", 4, "--learning-rate", 1e-2, "--max-length", 128, "--save-steps", 3, "--logging-steps", 1,
        "--use-cpu",
    )  # fmt: skip
    run_script("sft.py", *common, "--max-steps", 3)
    assert (out / "checkpoint-3").is_dir()
    first_run = json.loads((out / "trainer_state.json").read_text())["log_history"]
    run_script("sft.py", *common, "--max-steps", 6, "--resume-from-checkpoint", out / "checkpoint-3")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4, 5, 6]
    # train_loss averages all six steps, not only the three of the resumed session.
    losses = logged_losses(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_loss"] == pytest.approx(sum(losses) / 6, rel=1e-6)
    assert metrics["train_loss"] != pytest.approx(sum(losses[3:]) / 3, rel=1e-3)
    # Steps 1-3 come from the checkpoint: a fresh 6-step run would have logged a slower-decaying learning rate.
    assert state["log_history"][:3] == first_run[:3]
    base, tuned = Llama2ForCausalLM.from_pretrained(model_dir), Llama2ForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name in tuned.state_dict())  # merged: a plain Llama 2 checkpoint
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, tuned.model.layers[0].self_attn.q_proj.weight)


def test_sft_script_runs_distributed_on_two_cpu_processes(tmp_path):
    model_dir, out = save_causal_lm(tmp_path / "model"), tmp_path / "out"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    launch_script(
        launcher, "sft.py", "--model", model_dir, "--train-file", sft_data(tmp_path, n=16), "--output-dir", out,
        "--max-steps", 4, "--max-length", 128, "--logging-steps", 1, "--save-strategy", "no", "--use-cpu",
        "--ddp-backend", "gloo",
    )  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), Llama2ForCausalLM)


def test_cli_closes_the_process_group_of_a_run_that_ends_well(tmp_path):
    """Left open, gloo's threads met the interpreter's exit unjoined and aborted a rank after it had saved."""

    def main(argv, fail: bool = False):
        store = f"file://{tmp_path / ('failed' if fail else 'ok')}"
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        if fail:
            raise InputError("bad data")

    cli(main)([])
    assert not torch.distributed.is_initialized()
    with pytest.raises(SystemExit):
        cli(functools.partial(main, fail=True))([])
    # After a failure the group stays: closing it would wait on ranks that may never come.
    assert torch.distributed.is_initialized()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "records, extra, message",
    [
        ([{"prompt": "the cat", "response": "red"}, {"prompt": "the dog"}], (), "sft.jsonl:2: need .messages."),
        (
            [{"prompt": "the cat", "response": "red"}, {"prompt": "the cat", "response": "red " * 300}],
            ("--max-length", 512),
            "sft.jsonl:2: .* tokens, longer than the model's context of 256 tokens; pass --max-length 256",
        ),
    ],
)
def test_sft_script_reports_a_data_error_in_one_line(tmp_path, capsys, records, extra, message):
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    line = script_error(
        "sft.py", "--model", save_causal_lm(tmp_path / "model"), "--train-file", data, "--output-dir", tmp_path / "out",
        "--use-cpu", *extra, capsys=capsys,
    )  # fmt: skip
    assert re.search(message, line), line


def test_whole_run_loss_weighs_each_logged_loss_by_its_steps():
    # Logged every 2 steps, checkpoint at step 5 (step 5 never logged), resumed for 3 steps averaging 0.5.
    history = [
        {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 9.0},
        {"step": 4, "loss": 1.0},
        {"step": 7, "loss": 0.1},
    ]
    assert whole_run_loss(history, resumed_at=5, session_loss=0.5, session_steps=3) == pytest.approx(
        (2.0 * 2 + 1.0 * 2 + 0.5 * 3) / 7
    )
    assert whole_run_loss(history[:1], resumed_at=0, session_loss=0.5, session_steps=3) == 0.5  # not resumed


def test_every_accepted_format_gives_its_tokens_and_loss(tokenizer):
    encode, bos, eos = tokenizer_encoder(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    question, answer = qa_pairs(1)[0]
    chat_ids, chat_labels = encode_dialog(exchange(question, answer), encode, bos, eos)
    # TRL's conversational forms and this package's own give the same chat sample.
    for record in (
        {"messages": exchange(question, answer)},
        {"prompt": question, "response": answer},
        {"prompt": exchange(question, answer)[:1], "completion": exchange(question, answer)[1:]},
    ):
        assert encode_record(record, tokenizer) == (chat_ids, chat_labels), record
    # Plain text: no chat tags; prompt/completion learns the completion, text learns every token.
    ids, labels = encode_record({"prompt": question, "completion": answer}, tokenizer)
    head = [bos, *encode(question)]
    assert ids == [*head, *encode(answer), eos] and labels == [IGNORE_INDEX] * len(head) + ids[len(head) :]
    ids, labels = encode_record({"text": answer, "prompt": None}, tokenizer)  # null fields count as absent
    assert ids == [bos, *encode(answer), eos] and labels[1:] == ids[1:]


def test_a_conversational_prompt_masks_its_own_answers(tokenizer):
    earlier = exchange("the cat?", "red")
    record = {"prompt": [*earlier, {"role": "user", "content": "the dog?"}], "completion": exchange("", "blue")[1:]}
    encode = tokenizer_encoder(tokenizer)
    ids, labels = encode_record(record, tokenizer)
    full_ids, full_labels = encode_dialog([*record["prompt"], *record["completion"]], encode, 1, 2)
    n_prompt = len(encode_dialog(record["prompt"], encode, 1, 2)[0])
    assert ids == full_ids and any(label != IGNORE_INDEX for label in full_labels[:n_prompt])  # "red" would be learnt
    assert labels == [IGNORE_INDEX] * n_prompt + full_labels[n_prompt:] and labels.count(2) == 1


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "the cat", "completion": [{"role": "assistant", "content": "red"}]}, "both be text or both"),
        ({"text": "the cat </s> sat"}, "control tokens"),
        ({"text": ["the cat"]}, "expected text, got list"),
        ({"completion": "red"}, "need \"messages\"; \"prompt\" and \"completion\""),
    ],
)
def test_malformed_records_of_each_format_are_refused(tokenizer, record, message):
    with pytest.raises(ValueError, match=message):
        encode_record(record, tokenizer)


def test_a_json_array_line_is_refused_with_its_line(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"text": "the cat"}\n[{"text": "the dog"}]\n')
    with pytest.raises(InputError, match=r"sft.jsonl:2: a JSON list where a record belongs"):
        load_sft_samples(str(path), tokenizer, max_length=32)

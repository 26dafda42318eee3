"""`llama2-convert` under bad input: each case is one `error:` line and exit code 2, with the input intact and no
temporary folder left; interruptions clean up; sizes are checked before memory is spent on them."""

import hashlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llama2_convert import hf, layout
from llama2_convert.layout import config_from_params, num_parameters, weights

from .llama2_reference import meta_shards, random_state, train_sentencepiece, write_llama2c_bin, write_meta_checkpoint
from .test_conversion import GQA, LLAMA2C, MHA, convert, to_meta

ROOT = Path(__file__).parents[1]


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its md5: what must still be there, unchanged, after a refused run."""
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name)


def assert_refused(capsys, command: str, message: str) -> str:
    """The run printed exactly one `llama2-convert COMMAND: error: ...` line containing `message`."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"llama2-convert {command}: error: "), err
    assert message in lines[-1] and "Traceback" not in err, err
    return lines[-1]


@pytest.fixture
def meta(tmp_path) -> Path:
    """A 1-shard MHA Meta checkpoint at tmp_path/in/m; outputs go to tmp_path/out."""
    return write_meta_checkpoint(tmp_path / "in" / "m", MHA, meta_shards(random_state(MHA, 96), 1))


def meta_to_hf(source: Path, output: Path, *options) -> int:
    return convert("meta-to-hf", "--input-dir", source, "--output-dir", output, *options)


def refused_meta(capsys, tmp_path, source: Path, message: str, *options) -> None:
    """meta-to-hf of `source` exits 2 with `message`, leaves `source` as it was and writes nothing."""
    before = files(source)
    assert meta_to_hf(source, tmp_path / "out" / "hf", *options) == 2
    assert_refused(capsys, "meta-to-hf", message)
    assert files(source) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@contextmanager
def address_space_limit(extra: int):
    """Let this process map at most `extra` more bytes: an allocation proportional to a bogus size fails fast
    with MemoryError instead of waking the OOM killer."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextmanager
def deadline(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- params.json ----------------------------------------------------------------------------------------------

PARAMS_ERRORS = {
    "invalid-json": ("{'dim': 64", "as JSON"),
    "not-an-object": ("[1, 2]", "holds list, not an object"),
    "multiple-of-0": (MHA | {"multiple_of": 0}, "multiple_of is 0; it must be a positive integer"),
    "string-dim": (MHA | {"dim": "64"}, 'dim is "64"; it must be a positive integer'),
    "float-layers": (MHA | {"n_layers": 2.0}, "n_layers is 2.0; it must be a positive integer"),
    "bool-heads": (MHA | {"n_heads": True}, "n_heads is true"),
    "vocab-0": (MHA | {"vocab_size": 0}, "vocab_size is 0; it must be a positive integer, or -1"),
    "norm-eps-nan": (MHA | {"norm_eps": math.nan}, "rms_norm_eps` must be a positive finite number"),
    "heads-not-dividing-dim": (MHA | {"n_heads": 5}, "must divide `hidden_size`"),
    "kv-heads-not-dividing": (MHA | {"n_kv_heads": 3}, "`num_key_value_heads` (3) must divide"),
    "negative-rope-theta": (MHA | {"rope_theta": -1.0}, "`rope_theta` must be a positive finite number"),
    "huge-rope-theta": (MHA | {"rope_theta": 10**400}, "describes no valid model: int too large"),
    "unknown-keys": (
        MHA | {"moe_experts": 8, "vision_chunk_size": 560},
        "does not know: moe_experts, vision_chunk_size",
    ),
}


@pytest.mark.parametrize("name", PARAMS_ERRORS)
def test_bad_params_json(tmp_path, meta, capsys, name):
    params, message = PARAMS_ERRORS[name]
    (meta / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    refused_meta(capsys, tmp_path, meta, message, "--skip-checksum")


@pytest.mark.parametrize("value", [-5, 0])
def test_bad_max_position_embeddings(tmp_path, meta, capsys, value):
    refused_meta(capsys, tmp_path, meta, f"--max-position-embeddings must be a positive integer, got {value}",
                 "--max-position-embeddings", value)  # fmt: skip


def test_harmless_params_keys_accepted(tmp_path, meta):
    """Meta's KV-cache sizes and `use_scaled_rope: false` do not change the model."""
    (meta / "params.json").write_text(
        json.dumps(MHA | {"max_seq_len": 512, "max_batch_size": 4, "use_scaled_rope": False})
    )
    assert meta_to_hf(meta, tmp_path / "hf", "--skip-checksum") == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"


def meta_scaled_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """Llama 3.1's `apply_scaling` (llama/model.py), with its constants."""
    scale, low, high, old_context = 8, 1, 4, 8192
    scaled = []
    for freq in (1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)).tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            scaled.append(freq)
        elif wavelength > old_context / low:
            scaled.append(freq / scale)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            scaled.append((1 - smooth) * freq / scale + smooth * freq)
    return torch.tensor(scaled)


def test_use_scaled_rope_is_llama3_rope_and_round_trips(tmp_path, meta):
    params = MHA | {"rope_theta": 500000.0, "use_scaled_rope": True}
    (meta / "params.json").write_text(json.dumps(params))
    assert meta_to_hf(meta, tmp_path / "hf", "--skip-checksum") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }  # fmt: skip
    from modeling_llama2 import Llama2ForCausalLM

    model = Llama2ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, meta_scaled_frequencies(16, 500000.0))
    assert to_meta(tmp_path / "hf", tmp_path / "back", 1, "--no-tokenizer") == 0
    back = json.loads((tmp_path / "back" / "params.json").read_text())
    assert back["use_scaled_rope"] is True and back["rope_theta"] == 500000.0


# --- sizes that the files cannot hold: refused before anything is built per layer ------------------------------


def bomb_meta(tmp_path: Path) -> list:
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    (source / "params.json").write_text(json.dumps(MHA | {"n_layers": 1_000_000_000}))
    return ["meta-to-hf", "--input-dir", source, "--skip-checksum"], "the shards hold"


def bomb_llama2c(tmp_path: Path) -> list:
    write_llama2c_bin(tmp_path / "model.bin", LLAMA2C, random_state(LLAMA2C, 80), version=1, seq_len=32)
    with open(tmp_path / "model.bin", "r+b") as f:
        f.seek(16)  # magic, version, dim, hidden_dim, then n_layers
        f.write((100_000_000).to_bytes(4, "little"))
    return ["llama2c-to-hf", "--checkpoint", tmp_path / "model.bin"], "its header describes"


def bomb_hf(tmp_path: Path) -> list:
    source = write_meta_checkpoint(tmp_path / "m", MHA, meta_shards(random_state(MHA, 96), 1))
    assert meta_to_hf(source, tmp_path / "hf") == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1_000_000_000}))
    return ["hf-to-meta", "--input-dir", tmp_path / "hf", "--num-shards", 1, "--no-tokenizer"], "holds 2 layers"


@pytest.mark.parametrize("bomb", [bomb_meta, bomb_llama2c, bomb_hf], ids=["meta", "llama2c", "hf"])
def test_claimed_sizes_are_checked_against_the_files_before_allocating(tmp_path, capsys, bomb):
    command, message = bomb(tmp_path)
    capsys.readouterr()
    with address_space_limit(2 << 30):  # a list of a billion layers' weights would need far more
        assert convert(*command, "--output-dir", tmp_path / "out") == 2
    assert_refused(capsys, command[0], message)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_num_parameters_counts_the_weights():
    for params, tied in ((GQA, False), (MHA, True)):
        config = config_from_params(params, tokenizer=None, max_position_embeddings=64)
        config.tie_word_embeddings = tied
        listed = sum(math.prod(w.shape) for w in weights(config) if not (tied and w.hf == "lm_head.weight"))
        assert num_parameters(config) == listed


# --- checklist.chk --------------------------------------------------------------------------------------------

CHECKLIST_ERRORS = {
    "device": ("d41d8cd98f00b204e9800998ecf8427e  /dev/zero", "'/dev/zero' lies outside"),
    "parent": ("d41d8cd98f00b204e9800998ecf8427e  ../../etc/hostname", "'../../etc/hostname' lies outside"),
    "symlink-to-device": ("d41d8cd98f00b204e9800998ecf8427e  zero", "zero, which is not a plain file"),
    "folder": ("d41d8cd98f00b204e9800998ecf8427e  sub", "sub, which is not a plain file"),
    "malformed": ("this is not an md5 line", "line 3: 'this is not an md5 line' is not 'MD5SUM  FILENAME'"),
    "short-digest": ("d41d8cd9  params.json", "is not 'MD5SUM  FILENAME'"),
}


@pytest.mark.parametrize("name", CHECKLIST_ERRORS)
def test_bad_checklist_entries_are_refused_unread(tmp_path, meta, capsys, name):
    line, message = CHECKLIST_ERRORS[name]
    (meta / "zero").symlink_to("/dev/zero")
    (meta / "sub").mkdir()
    (meta / "checklist.chk").write_text((meta / "checklist.chk").read_text() + line + "\n")
    with deadline(60):  # reading /dev/zero would never end
        refused_meta(capsys, tmp_path, meta, message)


def test_gnu_md5sum_formats_are_accepted(tmp_path, meta, capsys):
    """Upper-case digests and the binary-mode `*` marker, as `md5sum -b` writes them, verify; a wrong one fails."""
    lines = [line.split() for line in (meta / "checklist.chk").read_text().splitlines()]
    (meta / "checklist.chk").write_text("".join(f"{digest.upper()} *{name}\n" for digest, name in lines))
    assert meta_to_hf(meta, tmp_path / "hf") == 0
    digest, name = lines[0]
    (meta / "checklist.chk").write_text(f"{'0' * 32} *{name}\n")
    refused_meta(capsys, tmp_path, meta, f"{name} does not match its md5 sum")


# --- the output folder ----------------------------------------------------------------------------------------


def output_is_input(tmp_path, source):
    return source


def output_contains_input(tmp_path, source):
    return tmp_path / "in"


def output_inside_input(tmp_path, source):
    return source / "hf"


def output_links_to_input(tmp_path, source):
    (tmp_path / "link").symlink_to(source)
    return tmp_path / "link"


@pytest.mark.parametrize("output", [output_is_input, output_contains_input, output_inside_input, output_links_to_input])
@pytest.mark.parametrize("command", ["meta-to-hf", "hf-to-meta"])
def test_output_overlapping_the_input_is_refused(tmp_path, meta, capsys, output, command):
    if command == "hf-to-meta":
        assert meta_to_hf(meta, tmp_path / "in" / "hf") == 0
        shutil.rmtree(meta)
        meta = (tmp_path / "in" / "hf").rename(meta)
    before = files(tmp_path / "in")
    options = ("--num-shards", 1, "--no-tokenizer") if command == "hf-to-meta" else ()
    target = output(tmp_path, meta)
    assert convert(command, "--input-dir", meta, "--output-dir", target, "--overwrite", *options) == 2
    assert_refused(capsys, command, "is, contains or lies inside the input")
    assert files(tmp_path / "in") == before and not leftovers(tmp_path)


@pytest.mark.parametrize("where", [".", ".."])
def test_output_that_is_or_contains_the_current_folder_is_refused(tmp_path, meta, capsys, monkeypatch, where):
    (tmp_path / "work" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "here")
    assert meta_to_hf(meta, where, "--overwrite") == 2
    assert_refused(capsys, "meta-to-hf", "is the current folder or contains it")
    assert not leftovers(tmp_path) and not any((tmp_path / "work" / "here").iterdir())


def test_output_that_is_a_file(tmp_path, meta, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "hf").write_text("precious")
    for options in ((), ("--overwrite",)):
        assert meta_to_hf(meta, tmp_path / "out" / "hf", *options) == 2
        assert_refused(capsys, "meta-to-hf", "is a file; name a folder to create")
    assert (tmp_path / "out" / "hf").read_text() == "precious" and not leftovers(tmp_path)


def test_output_parent_that_is_a_file(tmp_path, meta, capsys):
    (tmp_path / "out").write_text("precious")
    assert meta_to_hf(meta, tmp_path / "out" / "sub" / "hf") == 2
    assert_refused(capsys, "meta-to-hf", "out is a file, so --output-dir")
    assert (tmp_path / "out").read_text() == "precious"


def test_output_parent_unwritable(tmp_path, meta, capsys, monkeypatch):
    """Faked with os.access: as root (as these tests often run), permissions do not stop a write."""
    (tmp_path / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(hf.os, "access", lambda path, mode: Path(path) != tmp_path / "locked" and real(path, mode))
    assert meta_to_hf(meta, tmp_path / "locked" / "hf") == 2
    assert_refused(capsys, "meta-to-hf", "Cannot write in")
    assert not any((tmp_path / "locked").iterdir())


def test_overwrite_swaps_before_deleting(tmp_path, meta, monkeypatch):
    """The old output is deleted only once the new one is in place; a failing rename puts the old one back."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("old")
    seen = []
    rmtree = shutil.rmtree

    def watch(path, *args, **kwargs):
        seen.append((Path(path).name, (tmp_path / "hf" / "config.json").exists()))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(hf.shutil, "rmtree", watch)
    assert meta_to_hf(meta, tmp_path / "hf", "--overwrite") == 0
    assert [(name.split("-")[0], new_in_place) for name, new_in_place in seen] == [(".hf.old", True)]
    assert not leftovers(tmp_path)

    replace = os.replace
    monkeypatch.setattr(hf.os, "replace", lambda a, b: 1 / 0 if ".partial-" in str(a) else replace(a, b))
    with pytest.raises(ZeroDivisionError):
        meta_to_hf(meta, tmp_path / "hf", "--overwrite")
    assert (tmp_path / "hf" / "config.json").exists() and not leftovers(tmp_path)


# --- interruptions and what they leave ------------------------------------------------------------------------

SLOW_RUN = """
import sys, time
from llama2_convert import layout
from llama2_convert.__main__ import main

merge = layout._merge
def slow(*args):
    time.sleep(0.2)
    return merge(*args)

layout._merge = slow  # 0.2 s per tensor: long enough to be interrupted while writing
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_writing_cleans_up(tmp_path, meta):
    (tmp_path / "out" / "hf").mkdir(parents=True)
    (tmp_path / "out" / "hf" / "keep.txt").write_text("old")
    (tmp_path / "slow.py").write_text(SLOW_RUN)
    command = ["meta-to-hf", "--input-dir", str(meta), "--output-dir", str(tmp_path / "out" / "hf"), "--overwrite"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, str(tmp_path / "slow.py"), *command], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        start = time.monotonic()
        while not list((tmp_path / "out").glob(".hf.partial-*/*.safetensors")):
            assert run.poll() is None and time.monotonic() - start < 120, "no partial output appeared"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["hf"]
    assert (tmp_path / "out" / "hf" / "keep.txt").read_text() == "old"


def test_ctrl_c_while_writing_cleans_up(tmp_path, meta, capsys, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(layout, "_merge", interrupt)
    assert meta_to_hf(meta, tmp_path / "out" / "hf") == 130
    err = capsys.readouterr().err
    assert "interrupted by SIGINT; --output-dir was left as it was" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_full_disk_while_writing(tmp_path, meta, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf, "write_safetensors", full)
    assert meta_to_hf(meta, tmp_path / "out" / "hf") == 2
    assert_refused(capsys, "meta-to-hf", "failed: [Errno 28] No space left on device")
    assert not list((tmp_path / "out").iterdir())


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_next_run_removes_stale_partials_of_dead_runs(tmp_path, meta):
    out = tmp_path / "out"
    dead, alive = dead_pid(), os.getppid()
    for name in (
        f".hf.partial-{dead}-a1",
        f".hf.old-{dead}-b2",
        f".hf.partial-{alive}-c3",
        f".other.partial-{dead}-d4",
    ):
        (out / name).mkdir(parents=True)
        (out / name / "model.safetensors").write_bytes(b"\0" * 1000)
    (out / "hf").mkdir()
    assert meta_to_hf(meta, out / "hf", "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [f".hf.partial-{alive}-c3", f".other.partial-{dead}-d4", "hf"]


def test_killed_swap_is_undone_by_the_next_run(tmp_path, meta, capsys):
    """Killed between renaming the old output aside and the new one in: the next run puts the old one back."""
    out = tmp_path / "out"
    old = out / f".hf.old-{dead_pid()}-a1"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("old")
    assert meta_to_hf(meta, out / "hf") == 2
    assert_refused(capsys, "meta-to-hf", "is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["hf"] and (out / "hf" / "keep.txt").read_text() == "old"


# --- shards, tokenizers, llama2.c files ------------------------------------------------------------------------


def test_float64_shards_need_dtype(tmp_path, capsys):
    state = random_state(MHA, 96, dtype=torch.float64)
    source = write_meta_checkpoint(tmp_path / "in" / "m", MHA, meta_shards(state, 1))
    refused_meta(capsys, tmp_path, source, "is stored as torch.float64; Llama checkpoints are written in")
    assert meta_to_hf(source, tmp_path / "hf", "--dtype", "float32") == 0


def test_integer_shards_are_refused(tmp_path, capsys):
    state = {name: (t * 100).to(torch.int32) for name, t in random_state(MHA, 96).items()}
    source = write_meta_checkpoint(tmp_path / "in" / "m", MHA, meta_shards(state, 1))
    refused_meta(capsys, tmp_path, source, "holds torch.int32 values", "--dtype", "float32")


def test_zero_byte_shard(tmp_path, meta, capsys):
    (meta / "consolidated.00.pth").write_bytes(b"")
    refused_meta(capsys, tmp_path, meta, "consolidated.00.pth is empty (0 bytes)", "--skip-checksum")


TOKENIZERS = {
    "unigram": (dict(model_type="unigram", vocab_size=300), "cannot be converted exactly: model type UNIGRAM"),
    "nfkc": (dict(normalization="nmt_nfkc"), "cannot be converted exactly: normalization"),
    "garbage": (None, "is not a sentencepiece tokenizer.model"),
}


@pytest.mark.parametrize("name", TOKENIZERS)
def test_tokenizer_problems(tmp_path, capsys, name):
    options, message = TOKENIZERS[name]
    params = MHA | {"vocab_size": 400}
    source = write_meta_checkpoint(tmp_path / "in" / "m", params, meta_shards(random_state(params, 400), 1))
    if options is None:
        (source / "tokenizer.model").write_bytes(b"not a protobuf" * 10)
    else:
        (source / "tokenizer.model").write_bytes(train_sentencepiece(tmp_path / "sp", **options).read_bytes())
    refused_meta(capsys, tmp_path, source, message)


def test_tokenizer_option_not_a_file(tmp_path, meta, capsys):
    refused_meta(capsys, tmp_path, meta, "--tokenizer /dev/zero is not a file", "--tokenizer", "/dev/zero")


def test_llama2c_model_args_missing_keys(tmp_path, capsys):
    state = random_state(LLAMA2C, 80)
    torch.save({"model": state, "model_args": {"dim": 48, "n_layers": 2}}, tmp_path / "ckpt.pt")
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "out") == 2
    assert_refused(capsys, "llama2c-to-hf", "model_args lacks n_heads, vocab_size, max_seq_len, multiple_of")
    assert not (tmp_path / "out").exists()


def test_llama2c_negative_seq_len(tmp_path, capsys):
    write_llama2c_bin(tmp_path / "model.bin", LLAMA2C, random_state(LLAMA2C, 80), version=1, seq_len=-5)
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "model.bin", "--output-dir", tmp_path / "out") == 2
    assert_refused(capsys, "llama2c-to-hf", "header gives seq_len -5, which must be positive")


def test_llama2c_zero_byte_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert convert("llama2c-to-hf", "--checkpoint", tmp_path / "ckpt.pt", "--output-dir", tmp_path / "out") == 2
    assert_refused(capsys, "llama2c-to-hf", "is empty (0 bytes)")


# --- hf-to-meta -----------------------------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path, meta) -> Path:
    assert meta_to_hf(meta, tmp_path / "in" / "hf") == 0
    return tmp_path / "in" / "hf"


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def corrupt_safetensors(folder: Path) -> None:
    shard = next(folder.glob("*.safetensors"))
    shard.write_bytes(b"\x10\0\0\0\0\0\0\0{not json at all" + shard.read_bytes()[24:])


HF_ERRORS = {
    "corrupt-safetensors": (corrupt_safetensors, "as safetensors"),
    "invalid-index": (lambda f: (f / "model.safetensors.index.json").write_text("{"), "as JSON"),
    "index-without-map": (lambda f: (f / "model.safetensors.index.json").write_text("{}"), "has no weight_map"),
    "invalid-config": (lambda f: (f / "config.json").write_text("{"), "not a valid JSON file"),
    "gpt2": (lambda f: edit_config(f, model_type="gpt2", n_layer=2, n_embd=64), "holds a 'gpt2' model"),
    "mistral": (lambda f: edit_config(f, model_type="mistral", sliding_window=4096), "holds a 'mistral' model"),
    "sliding-window": (lambda f: edit_config(f, sliding_window=4096), "cannot express sliding_window 4096"),
    "rope-scaling": (
        lambda f: edit_config(f, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
        "cannot express RoPE linear",
    ),
    "mlp-bias": (lambda f: edit_config(f, mlp_bias=True), "cannot express mlp_bias"),
    "string-layers": (lambda f: edit_config(f, num_hidden_layers="2"), "num_hidden_layers"),
}


@pytest.mark.parametrize("name", HF_ERRORS)
def test_hf_to_meta_bad_folders(tmp_path, hf_dir, capsys, name):
    mutate, message = HF_ERRORS[name]
    mutate(hf_dir)
    before = files(hf_dir)
    assert to_meta(hf_dir, tmp_path / "out", 1, "--no-tokenizer") == 2
    assert_refused(capsys, "hf-to-meta", message)
    assert files(hf_dir) == before and not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("shards", [0, -2])
def test_hf_to_meta_num_shards_must_be_positive(tmp_path, hf_dir, capsys, shards):
    assert to_meta(hf_dir, tmp_path / "out", shards, "--no-tokenizer") == 2
    assert_refused(
        capsys, "hf-to-meta", f"--num-shards must be a positive integer (1 for 7B, 2 for 13B, 8 for 70B), got {shards}"
    )


def test_hf_to_meta_truncated_safetensors(tmp_path, hf_dir, capsys):
    """A shard cut short (an interrupted copy) is refused before anything is written."""
    shard = next(hf_dir.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    assert to_meta(hf_dir, tmp_path / "out", 1, "--no-tokenizer") == 2
    assert_refused(capsys, "hf-to-meta", "as safetensors")

"""Tiny random models shared by the model tests: small enough that the whole suite runs on two CPU cores."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llama2 import Llama2ForCausalLM, torch_internals
from modeling_llama2.inference import ahead_of_time, decoding

from .alignment_helpers import TINY, make_tokenizer, tiny_config

torch.set_num_threads(min(2, torch.get_num_threads()))


def model_pair(seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """Our model and transformers' `LlamaForCausalLM` holding the same random weights, in eval mode."""
    torch.manual_seed(seed)
    ours = Llama2ForCausalLM(tiny_config(**overrides)).eval()
    ref_kwargs = {**TINY, **overrides}
    ref = LlamaForCausalLM(LlamaConfig(**ref_kwargs)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.set_attn_implementation(attn_implementation)
    ref.set_attn_implementation(attn_implementation)
    return ours, ref


@pytest.fixture(scope="session", autouse=True)
def compiled_steps_cache(tmp_path_factory):
    """Compiled decode steps go to a directory of this test run, not the user's cache (`ahead_of_time.cache_dir`)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ahead_of_time.CACHE_ENV, str(tmp_path_factory.mktemp("modeling_llama2_cache")))
        yield


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    """The alignment tests' tiny Llama-like tokenizer, padding with `<unk>` as the scripts' `load_tokenizer` does."""
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


@pytest.fixture
def cheap_compile(monkeypatch, torch_compile_step):
    """Compile the decode step with dynamo alone (the `eager` backend runs the captured graph): the same graph capture,
    graph breaks (`fullgraph`), guards and recompiles, without AOTAutograd's tracing or inductor's seconds of C++
    compilation per graph (measured: 2.7 s against 3.6 s with `aot_eager` and about 30 s with inductor for the first
    graph). For tests of the decode loop's logic; the tests of the kernels themselves keep inductor. The step
    compiled ahead of time (AOTInductor, on a CPU) is left out: it is the same step through C++ code generation."""
    step = torch.compile(decoding.decode_step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(decoding, "compiled_decode_step", step)
    monkeypatch.setattr(decoding, "cpu_compiled_decode_step", step)


@pytest.fixture
def torch_compile_step(monkeypatch):
    """Decode through the `torch.compile` step (with inductor) where the CPU would take the step compiled ahead of
    time: the path of accelerators, shared-prefix caches and models `torch.export` cannot capture."""
    monkeypatch.setattr(decoding, "ahead_of_time_step", lambda *args: None)


@pytest.fixture
def aot_compiles(monkeypatch, tmp_path_factory) -> list:
    """The packages compiled ahead of time while the test runs (AOTInductor), one path each, from an empty disk
    cache (`ahead_of_time.cache_dir`): no step that an earlier test compiled is loaded instead. Paths, not the
    programs, which keep the tensors they were exported with."""
    monkeypatch.setenv(ahead_of_time.CACHE_ENV, str(tmp_path_factory.mktemp("modeling_llama2_cache")))
    compiles = []
    compile_program = torch_internals.aoti_compile
    monkeypatch.setattr(
        torch_internals,
        "aoti_compile",
        lambda program, path: compiles.append(path) or compile_program(program, path),
    )
    return compiles


@pytest.fixture
def every_guard(monkeypatch):
    """Every compiled decode step checks all its guards, as the first step of each loop does: a test that counts
    graphs then shows that a loop's steps need no new one, which is what `decoding.guarded_once` relies on to skip
    the guards after the first step (with them skipped, a graph that would need recompiling is silently reused)."""
    monkeypatch.setattr(decoding, "guarded_once", lambda step: step)


# The first lines of a script run in a fresh process that must not see this package (remote code, stock loading):
# an import of it fails there, as where it is not installed, though the editable install puts it on the path.
HIDE_PACKAGE = """
import importlib.abc, sys

class NoLocalPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_llama2", "llama2_convert"):
            raise ImportError(f"{name} is hidden from this process")

sys.meta_path.insert(0, NoLocalPackage())
try:
    import modeling_llama2
    raise SystemExit("the package is importable: this test would prove nothing")
except ImportError:
    pass
"""

"""A decode step compiled ahead of time (AOTInductor) for the CPU: each token is one call into compiled C++, with no
Python, dynamo guards or graph wrapper in between.

On a CPU a small model's step is short enough that what surrounds its kernels counts: at the 15M shape with int8
weights, about half of a 956 us `torch.compile` step ran outside the matrix products (Python, dynamo's guards,
the wrapper's argument checks; AVX-512 EPYC, 2 cores). `torch.export` captures the step once with every tensor
it reads as an input: the model's weights, the filled length and each layer's keys and values (written in place);
AOTInductor compiles that into a shared library that holds no tensor, so each call takes the model's and the
cache's own (nothing copied), and neither outlives its owner. Decode against the `torch.compile` step, paired
(`benchmarks/bench_step.py`, 15M, 2-core AVX2 EPYC): batch 1 fp32 1.18x [0.97, 1.22], int8 weight-only 1.41x
[1.33, 1.60], int8 activations 1.45x [0.94, 1.56]; batch 8 1.11x and 1.14x (with the weights still constants of
the library, which cost 2-4% less a step at 15M, batch 1, but kept them alive after the model).

A compiled step is kept per model and per everything its graph was traced with (module classes and plain
attributes, tensor layouts, configuration, sampling settings, which inputs are passed), so a new cache or prompt
of the same shape reuses it; anything else compiles anew. It is also kept on disk (`cache_dir`, as a package
without weights), under a hash of that signature, this CPU's instruction sets, torch's version and this package's
own source: a later process loads it instead of compiling (15M: 0.45 s against 17 s at the first call). The
directory keeps `CACHE_LIMIT` bytes of them, the most recently used.
"""

import contextlib
import hashlib
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, StaticCache

from .. import torch_internals
from .cpu_kernels import cpu_tag, kernel_takes

Step = Callable[..., torch.Tensor]
ALIGNMENT = 64  # bytes: torch's CPU allocator's, which compiled code may assume of its inputs
# Where compiled steps are kept between processes (`MODELING_LLAMA2_CACHE`, else the user's cache directory).
CACHE_ENV = "MODELING_LLAMA2_CACHE"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the source whose every file a compiled step may depend on
# Bytes of compiled steps kept on disk (2.3-3.5 MB each at 15M and 125M): beyond it the least recently used go.
CACHE_LIMIT = 1 << 30


def cache_dir() -> Path:
    """The directory of compiled steps: `$MODELING_LLAMA2_CACHE/aot`, else `~/.cache/modeling_llama2/aot`."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "modeling_llama2")
    return Path(root) / "aot"


_source_digest: str | None = None


def source_digest() -> str:
    """A hash of this package's source files (Python and C++): an edited checkout never loads a step compiled from
    the code before."""
    global _source_digest
    if _source_digest is None:
        digest = hashlib.sha256()
        for path in sorted(PACKAGE_ROOT.rglob("*")):
            if path.suffix in (".py", ".cpp", ".h"):
                digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes())
        _source_digest = digest.hexdigest()
    return _source_digest


def package_path(key: tuple) -> Path:
    """Where the step of signature `key` is kept on disk."""
    text = repr((key, torch.__version__, cpu_tag(), source_digest()))
    return cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt2"


def load_or_compile(program_of: Callable[[], torch.export.ExportedProgram], path: Path):
    """The loaded step kept at `path`, or `program_of()` compiled, kept there (written whole, then renamed: a
    concurrent or interrupted compile never leaves a partial package) and loaded. A load marks the package used;
    a new one makes room for itself within `CACHE_LIMIT` (`prune`)."""
    if path.is_file():
        try:
            runner = torch_internals.aoti_load(path)
        except RuntimeError as error:  # unreadable (or from an incompatible build): compiled again below
            warnings.warn(f"The compiled step {path} could not be loaded ({error}); compiling it again.", stacklevel=4)
        else:
            with contextlib.suppress(OSError):  # a read-only cache: nothing is pruned from it either
                os.utime(path)
            return runner
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        written = torch_internals.aoti_compile(program_of(), Path(work) / path.name)
        os.replace(written, path)
    prune(path.parent, keep=path, limit=CACHE_LIMIT)
    return torch_internals.aoti_load(path)


def prune(directory: Path, *, keep: Path, limit: int) -> None:
    """Delete the least recently used packages of `directory` (by modification time, which a load renews) beyond
    `limit` bytes in all, never `keep`. Another process may delete or load the same files meanwhile: a package gone
    is skipped, and one deleted under a loader is compiled again there."""
    packages = []
    for package in directory.glob("*.pt2"):
        with contextlib.suppress(FileNotFoundError):
            stat = package.stat()
            packages.append((stat.st_mtime, stat.st_size, package))
    total = 0
    for _, size, package in sorted(packages, key=lambda entry: entry[0], reverse=True):
        total += size
        if total > limit and package != keep:
            package.unlink(missing_ok=True)


class ExportedStep(nn.Module):
    """`step(model, tokens, cache, *settings, position_ids, attention_mask)` as a module `torch.export` can
    capture, every tensor it reads an input: the model's parameters and buffers (in `names`' order), the cache's
    filled length and each layer's keys and values (the step writes the new token's keys and values into them in
    place). A compiled program given the weights as constants instead holds them past the model's life: torch 2.13's
    user-managed constants (`load_constants(..., user_managed=True)`) take a reference to each that nothing drops."""

    def __init__(self, step: Step, model: PreTrainedModel, cache: StaticCache, settings: tuple, names: list[str]):
        super().__init__()
        # Held outside the module's tree: export would take a submodule's tensors for the program's constants.
        self.__dict__["stepper"] = Stepper(step, model, cache, settings)
        self.names = names

    def forward(
        self,
        weights: list[torch.Tensor],
        tokens: torch.Tensor,
        length: torch.Tensor,
        keys_values: list[torch.Tensor],
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inputs = (tokens, length, keys_values, position_ids, attention_mask)
        return torch.func.functional_call(self.stepper, dict(zip(self.names, weights, strict=True)), inputs)


class Stepper(nn.Module):
    """The step over `model` (its tensors under `model_tensors`' names) and `cache`, its keys, values and filled
    length given each call."""

    def __init__(self, step: Step, model: PreTrainedModel, cache: StaticCache, settings: tuple) -> None:
        super().__init__()
        self.step, self.model, self.cache, self.settings = step, model, cache, settings

    def forward(self, tokens, length, keys_values, position_ids, attention_mask) -> torch.Tensor:
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = keys_values[2 * i], keys_values[2 * i + 1]
            # Each layer its own copy of the length, which `StaticLayer.update` advances in place and the graph
            # then drops: an in-place update of a length buffer is lost in export, because transformers' mask
            # code passes layer 0's through a no-op `.to()` and export applies the update to that alias.
            layer.cumulative_length = length.clone()
        return self.step(self.model, tokens, self.cache, *self.settings, position_ids, attention_mask)


def cache_inputs(cache: StaticCache) -> list[torch.Tensor]:
    """Each layer's keys and values, in `ExportedStep`'s order."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def model_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers under `Stepper`'s names, a tied one under its first name only."""
    return dict(model.named_parameters(prefix="model")) | dict(model.named_buffers(prefix="model"))


def layout(t: torch.Tensor) -> tuple:
    """What compiled code assumes of a tensor beside its values: shape, strides, dtype, device, and whether its data
    is aligned for vector loads."""
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % ALIGNMENT == 0


def module_state(module: nn.Module) -> tuple:
    """A module's class and public plain attributes (flags, numbers, strings; functions by name), on which its
    forward may branch beside its tensors: an int8 linear's activations mode, the attention kernel a layer was
    given. Private ones are bookkeeping (an int8 linear's fbgemm pack, made by a long prompt, which no step calls)."""
    state = []
    for name, value in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if value is None or isinstance(value, (bool, int, float, str)):
            state.append((name, value))
        elif callable(value) and hasattr(value, "__qualname__"):
            state.append((name, f"{getattr(value, '__module__', '')}.{value.__qualname__}"))
    return type(module), tuple(state)


def signature(model: PreTrainedModel, tensors: dict[str, torch.Tensor], *inputs, settings: tuple) -> tuple:
    """What a step's graph depends on beside its tensors' values: each module's class and plain attributes, every
    tensor's name and layout (`tensors`: the model's, `model_tensors`), the configuration (attention kernel
    included), the inputs' layouts (None where not passed) and the sampling settings."""
    modules = tuple((name, *module_state(module)) for name, module in model.named_modules())
    tensors = tuple((name, *layout(t)) for name, t in tensors.items())
    shapes = tuple(None if t is None else layout(t) for t in inputs)
    config = (model.config.to_json_string(), model.config._attn_implementation)
    return modules, tensors, config, shapes, settings


_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {signature: AOTI runner}


def applies(model: PreTrainedModel, cache: StaticCache, rows: int) -> bool:
    """Whether a decode of `rows` rows over `cache` takes a step compiled ahead of time: on a CPU, over a plain
    `StaticCache` (a shared-prefix cache keeps its prompts outside the keys and values a step takes), as many rows
    as the rows kernels take (beyond, the CPU linears call oneDNN and fbgemm through Python ops, which compiled C++
    cannot call), and a model whose step `torch.export` can capture (`exportable`)."""
    return (
        type(cache) is StaticCache
        and cache.layers[0].keys.device.type == "cpu"
        and kernel_takes(rows)
        and exportable(model)
    )


def fixed_graph(model: PreTrainedModel) -> bool:
    """Whether one fixed-shape graph computes every step of `model`: not with dynamic (NTK) RoPE, whose frequencies
    grow with the positions seen, a branch on tensor values that `torch.export` and a `fullgraph` `torch.compile`
    both refuse."""
    return (getattr(model.config, "rope_parameters", None) or {}).get("rope_type") != "dynamic"


def exportable(model: PreTrainedModel) -> bool:
    """Whether the step of `model` can be captured by `torch.export`: one fixed graph (`fixed_graph`), and no module
    runs hooks (accelerate's offloading, a user's), which a captured graph would run once, at capture, and never
    again."""
    return fixed_graph(model) and not any(torch_internals.has_hooks(m) for m in model.modules())


def compile_step(
    step: Step,
    model: PreTrainedModel,
    cache: StaticCache,
    tokens: torch.Tensor,
    *,
    settings: tuple,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    compile: bool = True,
) -> "BoundStep | None":
    """`step` for this model, cache and settings, compiled ahead of time (once per `signature`, or loaded from disk),
    with the model's tensors and this cache (`BoundStep`). None where export or AOTInductor refuses the
    step (with a warning, once per `signature`), and with `compile=False` where no compiled step is at hand."""
    length = cache.layers[0].cumulative_length
    weights = model_tensors(model)
    key = signature(model, weights, tokens, cache.layers[0].keys, position_ids, attention_mask, settings=settings)
    steps = _steps.setdefault(model, {})
    if key not in steps:
        path = package_path(key)
        if not compile and not path.is_file():
            return None
        exported = ExportedStep(step, model, cache, settings, list(weights))
        saved = [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers]
        try:
            steps[key] = load_or_compile(
                lambda: torch.export.export(
                    exported,
                    (list(weights.values()), tokens, length.clone(), cache_inputs(cache), position_ids, attention_mask),
                ),
                path,
            )
        except Exception as error:  # export and AOTInductor refuse what they cannot capture in many ways
            warnings.warn(
                f"The decode step could not be compiled ahead of time ({type(error).__name__}: {error}); it is "
                "compiled with torch.compile instead.",
                stacklevel=3,
            )
            steps[key] = None
        finally:  # tracing set the layers' tensors to its stand-ins
            for layer, (keys, values, filled) in zip(cache.layers, saved, strict=True):
                layer.keys, layer.values, layer.cumulative_length = keys, values, filled
    if steps[key] is None:
        return None
    return BoundStep(steps[key], list(weights.values()), cache)


class BoundStep:
    """A compiled step's runner with the inputs that stay the same from token to token: the model's tensors and the
    cache it decodes over. Called with the step's changing inputs, `(tokens, position_ids, attention_mask)`, it
    returns the step's output and advances the cache's filled length, which the compiled step reads but leaves."""

    def __init__(self, runner, weights: list[torch.Tensor], cache: StaticCache) -> None:
        self.runner = runner
        self.lengths = [layer.cumulative_length for layer in cache.layers]
        self.inputs = [*weights, None, self.lengths[0], *cache_inputs(cache)]
        self.tokens_at = len(weights)

    def __call__(
        self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = self.inputs.copy()
        inputs[self.tokens_at] = tokens
        inputs += [t for t in (position_ids, attention_mask) if t is not None]
        out = torch_internals.aoti_run(self.runner, inputs)
        for length in self.lengths:
            length.add_(1)
        return out

"""Every private torch API this project uses, reached here and nowhere else.

None of them has a public equivalent in the torch versions the package supports (the comment at each says why). A
torch release may move any of them, and that must not stop `import modeling_llama2` or the converter: what is
missing is recorded at import, and only the feature that needs it fails, when it is used, with one message that
names the torch versions it was written for.
"""

import contextlib

import torch

WRITTEN_FOR = "torch >= 2.13, < 2.15"
FAST_CPU = "the CPU kernels (`use_cpu_kernels`)"
INT8_CPU = "fbgemm's int8 linear (`quantize_int8` on a CPU)"
INT8PACK_CPU = "aten's weight-only int8 matmul (`quantize_int8(activations='float')` on a CPU, one row)"
META_EXPORT = "`hf-to-meta`"

_missing: dict[str, list[str]] = {}  # feature -> what this torch lacks of what it needs

try:
    # fbgemm's prepacked int8 weight is a TorchScript object; registering an opaque type is the only way to pass such
    # an object through a `torch.compile` graph into a custom op.
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:
    _missing.setdefault(INT8_CPU, []).append("torch._library.opaque_object")
    OpaqueBase = None
    register_opaque_type = None

try:
    # `hf-to-meta` writes each shard as a data-less skeleton (`skip_data`) and fills it through a memory map. That
    # needs tensors with a dtype and shape but no storage that `torch.save` still writes as real tensors: fake
    # tensors; meta tensors would be saved as meta tensors.
    from torch._subclasses.fake_tensor import FakeTensorMode
except ImportError:
    _missing.setdefault(META_EXPORT, []).append("torch._subclasses.fake_tensor")
    FakeTensorMode = None


def _has_op(namespace: str, name: str) -> bool:
    try:
        getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return False
    return True


for _feature, _namespace, _name in [
    (FAST_CPU, "mkldnn", "_linear_pointwise"),
    (INT8_CPU, "quantized", "linear_dynamic"),
    (INT8_CPU, "quantized", "linear_prepack"),
    (INT8PACK_CPU, "aten", "_weight_int8pack_mm"),
]:
    if not _has_op(_namespace, _name):
        _missing.setdefault(_feature, []).append(f"torch.ops.{_namespace}.{_name}")


def require(feature: str) -> None:
    """Raise one clear error if this torch lacks a private API that `feature` needs."""
    if feature in _missing:
        raise RuntimeError(
            f"{feature} needs {', '.join(_missing[feature])}, which torch {torch.__version__} lacks; it was written "
            f"for {WRITTEN_FOR}. Install a torch in that range, or do without {feature}."
        )


def available(feature: str) -> bool:
    return feature not in _missing


def onednn_linear_2d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight^T` for 2-D `x` through oneDNN: `F.linear` on a CPU calls MKL, and oneDNN's linear is reachable only
    as this private operator (the one inductor's own CPU lowering calls)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def fbgemm_int8_linear_2d(x: torch.Tensor, packed: torch.ScriptObject) -> torch.Tensor:
    """fbgemm's dynamic int8 linear on a prepacked weight: the kernel behind the deprecated `torch.ao` dynamic
    quantization, which has no other public entry point for a weight packed once."""
    return torch.ops.quantized.linear_dynamic(x, packed, FBGEMM_REDUCE_RANGE)


# 8-bit activations (reduce_range=False) cut the logit error here by 40%, but they need VNNI's int32 accumulation:
# without it fbgemm sums pairs of u8 x s8 products in int16, which saturates (measured on an AVX2-only EPYC: logits
# 6% off their reference), so there activations get 7 bits, as torch's own fbgemm qconfig does. torch reports VNNI
# only through this private check; where it is missing, 7 bits are always safe.
FBGEMM_REDUCE_RANGE = not getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`(x @ weight^T) * scale` for a 2-D `x` and an int8 `weight`, in `x`'s precision (weight-only int8): aten's
    kernel that converts each weight as it reads it, which torch exposes only as this private operator."""
    return torch._weight_int8pack_mm(x, weight, scale)


def fbgemm_pack_int8(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.ScriptObject:
    """fbgemm's prepacked form of an int8 weight with one scale per output row (and a float bias)."""
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    # The packing takes a per-channel quantized tensor; only this private constructor makes one from int8 values
    # that are already quantized (`torch.quantize_per_channel` would round a float copy again).
    qweight = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero_points, 0)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def recompile_limit(limit: int) -> contextlib.AbstractContextManager:
    """Let dynamo keep up to `limit` graphs of one function (its default is 8); torch has no public setting for it."""
    return torch._dynamo.config.patch(recompile_limit=limit)


def refused_recompile(error: RuntimeError) -> bool:
    """Whether `error` is dynamo refusing to compile a new graph under `skip_guard_eval_unsafe`: it raises a plain
    RuntimeError, told apart from others only by its message (torch 2.13; `guarded_once`'s test fails if a later
    torch words it otherwise)."""
    return "Recompilation triggered with skip_guard_eval_unsafe stance" in str(error)


def opaque_base() -> type:
    """Base class of an object a compiled graph passes through to a custom op unchanged (`object` where this torch
    has no opaque objects: such a class then cannot reach a compiled graph, and `require(INT8_CPU)` says why)."""
    return OpaqueBase or object


def holds_opaque(module: torch.nn.Module) -> bool:
    """Whether a submodule of `module` holds an opaque object as an attribute (which inductor's C++ wrapper cannot
    pass to an op: "arg type PyObject is not yet supported")."""
    if OpaqueBase is None:
        return False
    return any(isinstance(value, OpaqueBase) for m in module.modules() for value in vars(m).values())


def register_opaque(cls: type) -> type:
    """Class decorator: register `cls` as an opaque reference type where this torch has opaque objects."""
    if register_opaque_type is not None:
        register_opaque_type(cls, typ="reference")
    return cls


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling `module` would run hooks beside its forward (its own, or those registered for every module).
    torch keeps them in private dicts and says nowhere public whether there are any; torch 2.13's names, a missing
    one taken as a hook (the layer then runs through its own call, as always correct)."""
    hook_sets = (
        getattr(module, "_forward_hooks", None),
        getattr(module, "_forward_pre_hooks", None),
        getattr(torch.nn.modules.module, "_global_forward_hooks", None),
        getattr(torch.nn.modules.module, "_global_forward_pre_hooks", None),
    )
    return any(hooks is None or len(hooks) > 0 for hooks in hook_sets)


def aoti_compile(program: torch.export.ExportedProgram, path) -> str:
    """`program` compiled by AOTInductor into a package at `path`. Its entry points live in the private
    `torch._inductor`."""
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def aoti_load(path):
    """The AOTInductor package at `path`, loaded (its runner)."""
    return torch._inductor.aoti_load_package(str(path))


def aoti_run(runner, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The single output of a loaded AOTInductor program for its flat tensor `inputs`: the loader's own call, without
    the public wrapper's per-call parsing of the input and output specs."""
    return runner.loader.boxed_run(inputs)[0]

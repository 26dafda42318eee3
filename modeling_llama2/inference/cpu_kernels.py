"""Linear layers for fast inference on the CPU: each product goes to the kernel that is fastest for its number of
rows, also inside `torch.compile`.

Decoding multiplies a few rows of activations by every weight, so a step's speed is the speed at which weights
are read. On this project's 2-core x86 CPU (torch 2.13, fp32) MKL's GEMV reads a row-major `nn.Linear` weight at
8-13 GB/s, oneDNN at 3-26 GB/s and a compiled loop at 8-35 GB/s (us per call, weights cycled through 96 MB so
that they come from memory, as in a decode step; oneDNN on its prepacked layout, as fast as on the plain weight):

| weight (out x in) | rows | `F.linear` (MKL) | oneDNN | inductor reduction |
| --- | ---: | ---: | ---: | ---: |
| 768 x 288 | 1 | 108 | 160 | 58 |
| 2048 x 768 | 1 | 534 | 416 | 292 |
| 32000 x 288 (LM head) | 1 | 4363 | 2266 | 1041 |
| 32000 x 288 | 8 | 7286 | 3125 | 1956 |

- Inside a compiled graph, for one row (`MAX_REDUCTION_ROWS`), the product is written as a multiply and a sum
  (`(W[:, None, :] * x).sum(-1)`): inductor turns it into one vectorized loop over the weight's rows, split
  across threads and fused with the elementwise work around it, with no library call at all. Alone, the loop
  also wins at 8 rows (last line); inside the decode step, at 8 or 16 rows, it ran 2-8x slower than oneDNN.
- Otherwise, up to `MAX_KERNEL_ROWS` rows (a decode batch, best-of-N samples, eagerly also one row),
  `rows_linear.cpp`: a tile of weight rows stays in L1 while every row of x passes over it, so the weight is
  read from memory once for all rows, fp32 or int8 (weight-only, converted as read). On a 2-core AVX2 EPYC
  (2026-12-02, weights cycled from memory, the kernel's first version: 4 x 2 tiles also at one row), us per call,
  MKL / oneDNN / `rows_linear`:

  | weight (out x in) | 1 row | 8 rows | 16 rows |
  | --- | --- | --- | --- |
  | 288 x 288 | 49 / 127 / 38 | 78 / 191 / 50 | 90 / 174 / 59 |
  | 2048 x 768 | 681 / 521 / 365 | 1217 / 829 / 533 | 1187 / 1058 / 778 |
  | 768 x 2048 | 611 / 623 / 341 | 1032 / 885 / 459 | 998 / 824 / 652 |
  | 32000 x 288 | 5945 / 3228 / 3361 | 10797 / 6562 / 5052 | 12014 / 7454 / 5925 |

  Since then one row reads each weight row as one sequential stream (one 125M step's int8 weights, 95 MiB,
  cycled: 10.1-10.7 -> 18.7-23.7 GB/s, fp32 unchanged at 22-24) and several rows take 3 x 4 tiles (1.05-1.3x
  at 8-16 rows), or, from 8 rows whose x fits in 24 KB (the 15M shape's 288 inputs), each weight row streams once
  past 8 rows of x at a time, an int8 one converted as it is loaded (fp32 1.05-1.39x the tiles, decode b=8 at 15M
  1.19x [0.85, 1.34]; int8 1.29-1.46x a converted copy of the row, decode b=8 at 15M 1.12x [1.01, 1.34]).
  With AVX-512 one row reads 16 lanes a vector, half the instructions per weight (weight-only int8 decode b=1 at
  15M 1.34x [1.21, 1.57], paired; 125M, from memory, 1.00x).
  Int8 weights take it at one row too, also inside the compiled step (`quantization.Int8Linear`); fp32 ones keep
  the fused reduction there (the rows kernel instead: 0.84x [0.73, 0.93] at 15M, 1.03x [0.93, 1.05] at 125M,
  decode b=1).
  No library kernel does this: aten's weight-only `_weight_int8pack_mm` took 93 ms for the 32000 x 288 head at 8
  rows (9x MKL's fp32), and MKL's packed GEMM (`mkl._mkl_linear`) was no faster than plain MKL.
  One call takes several weights of one input, outputs side by side: a layer's q, k and v, and its gate and up
  (`modeling_llama2.joint_products`, `CPULinear.joint_forward`, `Int8Linear.joint_forward`), three kernel calls
  fewer a layer, the weights where they were. Decode against one call per weight, paired (2026-12-03): int8
  activations 1.17x [1.02, 1.23] at 15M and 1.05x [0.89, 1.20] at 125M, batch 1; weight-only 1.05x and 1.06x;
  batch 8 1.05-1.07x. The prefill keeps one product per weight (a 512-row product of one concatenated weight
  ran 0.93x), and so does one fp32 row in a compiled step (its fused reduction over one concatenated weight: 1.01x
  at 15M, 0.90x at 125M).
- Beyond that (a prefill), or where the rows kernel cannot be built (no C++ compiler), oneDNN's linear for weights
  of at least `MIN_ONEDNN_ELEMENTS` or calls of at least `MIN_ONEDNN_PRODUCTS` rows x weight elements (it pays
  about 20 us a call; in a compiled prompt's graph, every weight), MKL for the rest and where a gradient is wanted
  (`use_onednn`); the same for the dequantized product of an int8 weight-only prefill. On a 2-core AMD EPYC (Zen 5),
  where MKL takes its AVX2 code and oneDNN its AVX-512, oneDNN ran 2.0-2.2x MKL at 512 rows on every 15M and 125M
  weight (17 rows: 1.1-3.1x); with it a 512-token prefill of the 15M shape ran 1.38x (fp32) and 1.27x (int8
  weight-only), paired, median of 4 alternating processes.

With int8 activations (`quantization.Int8Linear`, activations="int8"), up to `MAX_KERNEL_ROWS` rows go to
`int8_rows_linear.cpp` (`int8_rows_linear`): x rounded as fbgemm rounds it, the 8-bit products summed exactly, so
the result is fbgemm's bit for bit, without fbgemm's per-call cost (decode, paired: 3.5x at batch 1 and 1.9x at
batch 8 on the 15M shape, 2.3x and 1.5x at 125M); on a CPU with VNNI several rows sum their products with
dpbusd, exactly: decode b=8, eager, 1.15x [1.04, 1.27] at 15M and 1.34x [1.22, 1.51] at 125M the int16 loop).

Attention of one query token (a decode step) goes to `one_query_attention.cpp` (`one_token_attention`, through
`Llama2Attention.one_token_attention`), built into the same extension: CPU flash attention's setup for one query
took a quarter of a batch-8 step at 15M.

oneDNN's linear, and fbgemm's int8 linear for `quantization.Int8Linear`, reach a compiled graph as custom ops;
fbgemm's prepacked weight (a TorchScript object) travels into its op as an opaque object. The private torch APIs
behind them are reached through `torch_internals`.
"""

import hashlib
import os
import platform
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import cpp_extension

from .. import torch_internals
from ..modeling_llama2 import Llama2Attention, one_query_sdpa_attention

MIN_ONEDNN_ELEMENTS = 2**19  # 768 x 768 and larger: below this oneDNN's per-call cost outweighs its faster GEMV
MIN_ONEDNN_PRODUCTS = 2**23  # rows x weight elements: from here (288 x 288 at 102 rows) oneDNN for any weight
MAX_REDUCTION_ROWS = 1
MAX_KERNEL_ROWS = 16  # `rows_linear` up to here; beyond, the weight is re-read often enough for BLAS to win
# one extension, built on first use
KERNEL_SOURCES = ("rows_linear.cpp", "one_query_attention.cpp", "int8_rows_linear.cpp")
# How they are built: this CPU's instructions, and OpenMP through torch's own libgomp.so.1 (already loaded: one
# thread pool).
KERNEL_CFLAGS, KERNEL_LDFLAGS = ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]
CPUINFO = "/proc/cpuinfo"  # where Linux lists the CPU's flags, for `cpu_tag`
_rows_kernel: bool | None = None  # whether `rows_linear.cpp` is built and loaded (None: not tried yet)


def cpu_tag() -> str:
    """A short hash of this CPU's architecture and instruction-set flags. The rows kernel is built with
    `-march=native`, and torch caches a build by its name: with the tag in the name, a `TORCH_EXTENSIONS_DIR` shared
    by different machines (a cluster's home directory) never loads a build whose instructions this CPU lacks."""
    flags = ""
    try:
        with open(CPUINFO) as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:  # not Linux: the architecture alone
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def rows_kernel() -> bool:
    """Whether `rows_linear` (and `one_token_attention`'s kernel) can run: on first (eager) call, build
    `KERNEL_SOURCES` with the C++ compiler that `torch.compile` also needs (about 15 s once; torch caches it in
    `TORCH_EXTENSIONS_DIR`) and load them. Where that fails, say so once and keep the library kernels."""
    global _rows_kernel
    if _rows_kernel is None and not torch.compiler.is_compiling():
        try:
            cpp_extension.load(
                name=f"modeling_llama2_rows_linear_{cpu_tag()}",
                sources=[os.path.join(os.path.dirname(__file__), name) for name in KERNEL_SOURCES],
                extra_cflags=KERNEL_CFLAGS,
                extra_ldflags=KERNEL_LDFLAGS,
                is_python_module=False,
            )
        except (OSError, RuntimeError, ImportError, ValueError) as error:
            warnings.warn(
                f"The several-row CPU linear kernel could not be built ({str(error).splitlines()[0]}); "
                "decoding falls back to MKL and oneDNN. Install a C++ compiler and `ninja` for it.",
                stacklevel=2,
            )
            _rows_kernel = False
        else:
            torch.library.register_fake("modeling_llama2_kernels::rows_linear")(_rows_products_fake)
            torch.library.register_fake("modeling_llama2_kernels::float_rows_linear")(_rows_products_fake)
            torch.library.register_fake("modeling_llama2_kernels::one_query_attention")(_one_query_attention_fake)
            torch.library.register_fake("modeling_llama2_kernels::int8_rows_linear")(_rows_products_fake)
            _rows_kernel = True
    return bool(_rows_kernel)


def _rows_products_fake(x: torch.Tensor, weights: list[torch.Tensor], *_) -> torch.Tensor:
    """The output of the rows kernels' ops (scales and levels do not shape it)."""
    return x.new_empty(x.shape[0], sum(weight.shape[0] for weight in weights))


def _one_query_attention_fake(q, k, v, mask, scale) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], q.shape[3])


def wants_gradient(x: torch.Tensor) -> bool:
    """Whether autograd will need the product's backward, which the oneDNN and rows kernels do not have (adapters
    trained on top of frozen linears take MKL)."""
    return x.requires_grad and torch.is_grad_enabled()


def kernel_takes(rows: int) -> bool:
    """Whether the rows kernels (`rows_linear`, `int8_rows_linear`) take a product of `rows` rows: at most
    `MAX_KERNEL_ROWS`, and the kernels built."""
    return rows <= MAX_KERNEL_ROWS and rows_kernel()


def use_rows_kernel(x: torch.Tensor) -> bool:
    """Whether `x`'s product goes through the rows kernels: fp32 rows on a CPU, as many as `kernel_takes`, no
    gradient wanted (the kernels have no backward)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not wants_gradient(x)
        and kernel_takes(x.numel() // x.shape[-1])
    )


def rows_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], scales: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """`x @ W^T` for each of `weights` (times its `scales` per output, for int8 weights), side by side in one
    output, through `rows_linear.cpp`, which reads each weight once for all rows of `x`: several weights (a layer's
    q, k and v) in one call and one parallel region."""
    flat = x.reshape(-1, x.shape[-1])
    if scales:
        y = torch.ops.modeling_llama2_kernels.rows_linear(flat, list(weights), list(scales))
    else:
        y = torch.ops.modeling_llama2_kernels.float_rows_linear(flat, list(weights))
    return y.view(*x.shape[:-1], y.shape[-1])


def int8_rows_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    scales: Sequence[torch.Tensor],
    *,
    reduce_range: bool = torch_internals.FBGEMM_REDUCE_RANGE,
) -> torch.Tensor:
    """`round(x) @ W^T * scale` for each of the int8 `weights` and their `scales`, side by side in one output,
    through `int8_rows_linear.cpp`, `x` rounded to 8 bits as fbgemm's dynamic int8 linear rounds it
    (`quantization.round_activations`, 7 bits with `reduce_range`) and the products summed exactly in integers:
    fbgemm's result, without its per-call cost. At one row (weights cycled as in a decode step's) as fast as the
    weight-only kernel and 2.9x fbgemm at 15M, 2.0x at 125M; at 8 rows 1.4x and 1.1x fbgemm (1.2x and 1.8x the
    weight-only kernel)."""
    levels = 127 if reduce_range else 255
    y = torch.ops.modeling_llama2_kernels.int8_rows_linear(
        x.reshape(-1, x.shape[-1]), list(weights), list(scales), levels
    )
    return y.view(*x.shape[:-1], y.shape[-1])


def may_join(x: torch.Tensor, linears: Sequence[nn.Module]) -> bool:
    """Whether a `joint_forward` computes `linears` on `x` in one rows-kernel call: decode rows (`use_rows_kernel`)
    and no hooks on the layers (accelerate's offloading, a user's), which only each layer's own call would run."""
    return use_rows_kernel(x) and not any(torch_internals.has_hooks(linear) for linear in linears)


def split_products(y: torch.Tensor, linears: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """`y`, the products of `linears` side by side (`rows_linear`, `int8_rows_linear`), as one output per linear,
    its bias added."""
    parts = y.split([linear.out_features for linear in linears], dim=-1)
    biases = [linear.bias for linear in linears]
    return tuple(part if bias is None else part + bias.to(y.dtype) for part, bias in zip(parts, biases, strict=True))


def use_reduction(x: torch.Tensor) -> bool:
    """Whether `x`'s product goes through `reduction_linear`: on a CPU, inside a compiled graph, for one row."""
    return x.device.type == "cpu" and torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= MAX_REDUCTION_ROWS


def reduction_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ W^T` as a multiply and a sum, for inductor to compile into one GEMV loop; `weight` may be int8 (the
    loop converts each value as it reads it). Only inside `torch.compile` and for `MAX_REDUCTION_ROWS` rows:
    eagerly it would build the (out, rows, in) product."""
    rows = x.reshape(-1, x.shape[-1])
    y = (weight.unsqueeze(1) * rows).sum(-1, dtype=x.dtype)
    return y.t().reshape(*x.shape[:-1], weight.shape[0])


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `x @ W^T` on the CPU (more rows than the rows kernels take, or no rows kernel) goes to oneDNN rather
    than MKL: where a large weight or many rows pay back oneDNN's cost per call, and no gradient is wanted (its op
    has no backward). Inside a compiled graph (a prompt's, for more rows than the rows kernels take) oneDNN for every
    weight: one graph for all prompt lengths, with no guard on the number of rows."""
    if wants_gradient(x):
        return False
    if torch.compiler.is_compiling():
        return True
    elements = weight.numel()
    return elements >= MIN_ONEDNN_ELEMENTS or x.numel() // x.shape[-1] * elements >= MIN_ONEDNN_PRODUCTS


@torch.library.custom_op("modeling_llama2::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ W^T` through oneDNN (as fast on the plain row-major weight as on its prepacked layout)."""
    y = torch_internals.onednn_linear_2d(x.reshape(-1, x.shape[-1]), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch_internals.register_opaque
class PackedWeight(torch_internals.opaque_base()):
    """A linear weight in a kernel's own layout (fbgemm's int8 pack). It is never written after packing, so
    copies of a module share it."""

    def __init__(self, packed: torch.ScriptObject) -> None:
        self.packed = packed

    def __deepcopy__(self, memo: dict) -> "PackedWeight":
        return self

    def __reduce__(self):
        # Inductor's graph cache pickles a graph's inputs into its key; the weight is an input, so its kind is
        # all the key needs. A pickled module packs its weight again on first use.
        return _unpickle_packed_weight, (type(self.packed).__name__,)


def _unpickle_packed_weight(kind: str) -> None:
    raise RuntimeError(f"A packed linear weight ({kind}) cannot be restored from a pickle: pack it again.")


def fbgemm_int8_linear(x: torch.Tensor, weight: PackedWeight, out_features: int) -> torch.Tensor:
    """`x @ W^T + b` for an fbgemm int8 pack of `W` and `b`."""
    y = torch_internals.fbgemm_int8_linear_2d(x.reshape(-1, x.shape[-1]), weight.packed)
    return y.view(*x.shape[:-1], out_features)


if torch_internals.available(torch_internals.INT8_CPU):  # an opaque argument needs opaque objects to be registered
    fbgemm_int8_linear = torch.library.custom_op("modeling_llama2::fbgemm_int8_linear", mutates_args=())(
        fbgemm_int8_linear
    )

    @fbgemm_int8_linear.register_fake
    def _(x: torch.Tensor, weight: PackedWeight, out_features: int) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], out_features)


def one_token_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One query token's attention (a decode step) through `one_query_attention.cpp`, which reads each key/value
    head's slots once for its query heads: against SDPA's CPU flash attention (one call, 15M shape, 144 slots)
    4.1x at batch 1, 1.9x at batch 8. Decode, paired (9 rounds): 15M fp32 1.08x [1.01, 1.10] at batch 1 and
    1.06x [0.93, 1.22] at batch 8, int8 weight-only 1.14x [1.07, 1.28] at batch 1; 125M (grouped heads) int8
    1.15x [1.08, 1.20] at batch 1, fp32 1.09x [1.04, 1.10] at batch 8. Where it does not apply (not fp32 on a CPU,
    a float mask, dropout, a gradient wanted, no kernel built), `modeling_llama2.one_query_sdpa_attention`."""
    mask = None if attention_mask is None else attention_mask[:, 0, 0, : key.shape[-2]].expand(query.shape[0], -1)
    if (
        query.device.type != "cpu"
        or query.dtype != torch.float32
        or (mask is not None and (mask.dtype != torch.bool or attention_mask.shape[2] != 1))
        or (dropout > 0 and module.training)
        or wants_gradient(query)
        or not rows_kernel()
    ):
        return one_query_sdpa_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    out = torch.ops.modeling_llama2_kernels.one_query_attention(query, key, value, mask, scaling)
    return out[:, None], None


class CPULinear(nn.Linear):
    """A frozen `nn.Linear` (fp32, CPU) that picks its kernel by the number of rows (see the module's docstring).
    Same parameters and state dict as the `nn.Linear` it replaces; its weight is not trained, but gradients still
    reach its input (for adapters trained on top)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_reduction(x):
            y = reduction_linear(x, self.weight)
        elif use_rows_kernel(x):
            y = rows_linear(x, [self.weight])
        elif use_onednn(x, self.weight):
            y = onednn_linear(x, self.weight)
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias

    @staticmethod
    def joint_forward(x: torch.Tensor, linears: Sequence["CPULinear"]) -> tuple[torch.Tensor, ...]:
        """Each of `linears` on `x` (`modeling_llama2.joint_products`): decode rows in one `rows_linear` call for all
        of them, other rows one product each (one row in a compiled graph keeps its fused reduction: inductor's
        loop over one concatenated weight was no faster)."""
        if use_reduction(x) or not may_join(x, linears):
            return tuple(linear(x) for linear in linears)
        return split_products(rows_linear(x, [linear.weight for linear in linears]), linears)


@torch.no_grad()
def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Make (in place) every fp32 CPU `nn.Linear` of `model` a `CPULinear`, and its attention layers' one-token
    steps `one_token_attention`, for fast inference on the CPU (`decoding.generate`, prefill, `generate`). The
    weights stay where they are, frozen: the model saves and copies as before."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("`use_cpu_kernels` needs a torch built with oneDNN (mkldnn); this one has none.")
    torch_internals.require(torch_internals.FAST_CPU)
    rows_kernel()
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = CPULinear
            module.requires_grad_(False)
    return use_cpu_attention(model)


def use_cpu_attention(model: nn.Module) -> nn.Module:
    """Make (in place) the one-token steps of `model`'s attention layers `one_token_attention` (which keeps SDPA
    wherever its kernel does not apply: another device or dtype, training)."""
    for module in model.modules():
        if isinstance(module, Llama2Attention):
            module.one_token_attention = one_token_attention
    return model

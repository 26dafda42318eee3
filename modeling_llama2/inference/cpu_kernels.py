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
- Otherwise oneDNN's linear for weights of at least `MIN_ONEDNN_ELEMENTS` (it pays about 20 us per call), and
  MKL for the small ones.

oneDNN's linear, and fbgemm's int8 linear for `quantization.Int8Linear`, reach a compiled graph as custom ops;
fbgemm's prepacked weight (a TorchScript object) travels into its op as an opaque object. The private torch APIs
behind them are reached through `torch_internals`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .. import torch_internals

MIN_ONEDNN_ELEMENTS = 2**19  # 768 x 768 and larger: below this oneDNN's per-call cost outweighs its faster GEMV
MAX_REDUCTION_ROWS = 1


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


class CPULinear(nn.Linear):
    """A frozen `nn.Linear` (fp32, CPU) that picks its kernel by the number of rows (see the module's docstring).
    Same parameters and state dict as the `nn.Linear` it replaces; its weight is not trained, but gradients still
    reach its input (for adapters trained on top)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_reduction(x):
            y = reduction_linear(x, self.weight)
        elif self.weight.numel() >= MIN_ONEDNN_ELEMENTS and not (x.requires_grad and torch.is_grad_enabled()):
            # oneDNN's op has no backward; an input that needs a gradient (adapters trained on top) takes MKL.
            y = onednn_linear(x, self.weight)
        else:
            return F.linear(x, self.weight, self.bias)
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Make (in place) every fp32 CPU `nn.Linear` of `model` a `CPULinear`, for fast inference on the CPU
    (`decoding.generate`, prefill, `generate`). The weights stay where they are, frozen: the model saves and copies
    as before."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("`use_cpu_kernels` needs a torch built with oneDNN (mkldnn); this one has none.")
    torch_internals.require(torch_internals.FAST_CPU)
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = CPULinear
            module.requires_grad_(False)
    return model

"""Linear layers whose weights are prepacked for the CPU's fastest kernels, callable inside `torch.compile`.

Decoding multiplies a few rows of activations by every weight. On this project's 2-core x86 CPU (torch 2.13,
fp32, one call, ms) MKL reads a row-major `nn.Linear` weight far below memory bandwidth, while oneDNN's
prepacked (blocked) layout runs near it but pays about 20 us per call:

| weight (out x in) | rows | `F.linear` | oneDNN prepacked |
| --- | ---: | ---: | ---: |
| 32000 x 768 (LM head) | 1 | 8.5 | 3.6 |
| 32000 x 768 | 8 | 19.4 | 4.0 |
| 2048 x 768 | 1 | 0.21 | 0.09 |
| 288 x 288 | 1 | 0.012 | 0.025 |

So `pack_linears` packs the weights of at least `MIN_PACKED_ELEMENTS` and leaves the small ones to MKL.

A packed weight (an oneDNN tensor, or fbgemm's int8 pack for `quantization.Int8Linear`) has no storage dynamo
can trace, so it travels as an opaque object into one custom op, `modeling_llama2::packed_linear`, which a
compiled graph calls like any other kernel.
"""

import torch
from torch import nn
from torch._library.opaque_object import register_opaque_type
from torch._opaque_base import OpaqueBase

MIN_PACKED_ELEMENTS = 2**19  # 768 x 768 and larger: below this oneDNN's per-call cost outweighs its faster GEMV


class PackedWeight(OpaqueBase):
    """A linear weight in a kernel's own layout: an oneDNN blocked fp32 tensor or an fbgemm int8 pack. It is
    never written after packing, so copies of a module share it."""

    def __init__(self, packed: torch.Tensor | torch.ScriptObject) -> None:
        self.packed = packed

    def __deepcopy__(self, memo: dict) -> "PackedWeight":
        return self

    def __reduce__(self):
        # Inductor's graph cache pickles a graph's inputs into its key; the weight is an input, so its kind is
        # all the key needs. A pickled model cannot bring its packed weights back: pack again after loading.
        return _unpickle_packed_weight, (type(self.packed).__name__,)


def _unpickle_packed_weight(kind: str) -> None:
    raise RuntimeError(
        f"A packed linear weight ({kind}) cannot be restored from a pickle: save the model before packing or "
        "quantizing it, and pack again after loading."
    )


register_opaque_type(PackedWeight, typ="reference")


@torch.library.custom_op("modeling_llama2::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: PackedWeight, out_features: int) -> torch.Tensor:
    """`x @ W^T` for a packed `W` (bias excluded for oneDNN, included in fbgemm's pack)."""
    rows = x.reshape(-1, x.shape[-1])
    if isinstance(weight.packed, torch.Tensor):
        y = torch.ops.mkldnn._linear_pointwise(rows, weight.packed, None, "none", [], "")
    else:
        # reduce_range=False keeps 8-bit activations (True: 7), which cut the logit error here by 40%; it relies
        # on VNNI's int32 accumulation, as fbgemm's int16 pair sums can saturate without it.
        y = torch.ops.quantized.linear_dynamic(rows, weight.packed, False)
    return y.view(*x.shape[:-1], out_features)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: PackedWeight, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """Inference-only `nn.Linear` (fp32, CPU) whose weight exists only in oneDNN's prepacked layout, so packing
    costs no extra memory; it has no `weight` parameter to train or save."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The row-count hint (1) picks oneDNN's layout for decoding; measured as fast at 8 rows and at 512.
        self.weight_packed = PackedWeight(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(x, self.weight_packed, self.out_features)
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # Without this the saved checkpoint would silently lack the weight.
        raise RuntimeError(
            f"`{prefix}weight` exists only prepacked for oneDNN and cannot be saved: save the model before "
            "`pack_linears`, or reload it from its checkpoint."
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_linears(model: nn.Module, make, names: set[str] | None = None) -> None:
    """Replace (in place) each `nn.Linear` of `model`, or those named in `names`, by `make(linear)`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (names is None or name in names):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


@torch.no_grad()
def pack_linears(model: nn.Module, min_elements: int = MIN_PACKED_ELEMENTS) -> nn.Module:
    """Prepack (in place) every fp32 CPU `nn.Linear` weight of at least `min_elements` for oneDNN, for fast
    inference on the CPU (`decoding.generate`, prefill, `generate`). The packed model cannot be trained or saved:
    pack after loading, and keep the checkpoint."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("`pack_linears` needs a torch built with oneDNN (mkldnn); this one has none.")
    names = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
        and m.weight.numel() >= min_elements
    }
    replace_linears(model, PackedLinear, names)
    return model

"""Int8 linear layers: each `nn.Linear` weight becomes int8 with one fp32 scale per output channel (symmetric,
absmax / 127), saved and loaded through safetensors under the original parameter names plus a `weight_scale`
beside each quantized `weight`.

Decoding reads every weight once per token, so a quarter of the bytes is up to four times the speed. The numerics
are the user's choice (`quantize_int8(model, activations=...)`, saved with the weights); where a product runs
only picks the kernel:
- "float" (weight-only, the default): y = x (W_int8 * scale)^T + b with `x` unrounded, on every path equal (to
  float rounding) to the fp32 model holding the dequantized weights.
- "int8": `x` is also rounded to 8 bits at run time, one scale and zero point per call for all its rows (fbgemm's
  dynamic quantization: `torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range)`; 7 bits on a CPU
  without VNNI, where fbgemm's 8-bit sums saturate), so a row's logits depend
  slightly on the other rows of its batch. The logit error against fp32 grows by about half (random weights, 64
  tokens, relative L2: 0.021 -> 0.030 at 15M, 0.036 -> 0.054 at 125M, in benchmarks/README.md).

Kernels on a CPU (fp32 activations):
- "float": up to `cpu_kernels.MAX_KERNEL_ROWS` rows (batch-1 and batch-N decode steps, best-of-N; eager or inside
  `torch.compile`) `cpu_kernels.rows_linear`, which reads the int8 weight once for all rows and converts each tile
  as it goes; for more rows (prefill) the weight dequantized for a oneDNN or MKL matmul (`cpu_kernels.use_onednn`),
  whose float copy is paid once for all the rows. Where the rows kernel cannot be built (no C++ compiler), one row
  in a compiled graph takes `cpu_kernels.reduction_linear` (a compiled loop that converts the weight as it reads
  it), one eager row aten's weight-only `_weight_int8pack_mm`, and several the dequantized matmul.
- "int8": up to `cpu_kernels.MAX_KERNEL_ROWS` rows (decode steps) `cpu_kernels.int8_rows_linear`, which rounds `x`
  as fbgemm does and sums the 8-bit products exactly, bit for bit fbgemm's result without its per-call cost; for
  more rows (prefill) fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic` on weights prepacked on
  first eager use, through `cpu_kernels`' custom op, also inside a compiled graph); before the first eager call,
  or without either kernel, its rounding in tensor ops (`round_activations`) before the "float" kernels.
Elsewhere (GPUs) `linear(x, int8 -> dtype) * scale`, which inductor fuses into one weight-streaming kernel.

The default is "float": exact (the dequantized model, whatever else is in the batch). activations="int8" costs
accuracy (above) and is as fast at batch 1 (the int8 rows kernel against the weight-only one, in one paired decode
run: 296 / 318 tok/s at 15M, 89 / 81 at 125M), faster at batch 8 (1236 / 1036 tok/s at 15M, 312 / 216 at 125M)
and for long prompts, where fbgemm's int8 products beat the float ones (125M: 1.45x for a 512-token prefill);
benchmarks/README.md times both.
"""

import os
import warnings
from collections.abc import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .. import torch_internals
from ..configuration_llama2 import Llama2Config
from ..modeling_llama2 import Llama2ForCausalLM
from ..torch_internals import INT8PACK_CPU
from .cpu_kernels import (
    PackedWeight,
    fbgemm_int8_linear,
    int8_rows_linear,
    may_join,
    onednn_linear,
    reduction_linear,
    rows_linear,
    split_products,
    use_cpu_attention,
    use_onednn,
    use_reduction,
    use_rows_kernel,
)

WEIGHTS_NAME = "model.int8.safetensors"
ACTIVATIONS = ("float", "int8")
DEFAULT_ACTIVATIONS = "float"
MIN_SCALE = 6.1e-5  # fbgemm's smallest activation scale (`quant_utils::ChooseQuantizationParams`)


def check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise ValueError(
            f"activations={activations!r} is not an int8 mode: pass 'float' (weight-only int8) or 'int8' (weights "
            "and activations)."
        )
    return activations


def round_activations(x: torch.Tensor, *, reduce_range: bool = torch_internals.FBGEMM_REDUCE_RANGE) -> torch.Tensor:
    """`x` rounded as fbgemm's dynamic int8 linear rounds it on this CPU, in tensor ops (so also inside a compiled
    graph and on any device): the range [min(x, 0), max(x, 0)] in 255 steps (127 with `reduce_range`, fbgemm's
    setting on CPUs without VNNI) with an integer zero point, as torch's `_choose_qparams_per_tensor` picks them,
    then `(clamp(round(x / scale + zero_point), 0, levels) - zero_point) * scale`."""
    levels = 127 if reduce_range else 255
    x32 = x.float()
    low, high = x32.amin().clamp(max=0).double(), x32.amax().clamp(min=0).double()
    steps = levels / (high - low).clamp(min=1e-300)  # 1 / scale (an all-zero x stays zero)
    # The zero point from either end of the range: equal but for rounding, so fbgemm takes the one of smaller terms.
    from_low, from_high = -low * steps, levels - high * steps
    zero_point = torch.where(-(low * steps).abs() < levels - (high * steps).abs(), from_low, from_high)
    zero_point = torch.round(zero_point).clamp(0, levels).float()
    scale = (1 / steps).float().clamp(min=MIN_SCALE)
    return ((torch.clamp(torch.round(x32 * (1 / scale) + zero_point), 0, levels) - zero_point) * scale).to(x.dtype)


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and a per-output-channel fp32 `weight_scale`: y = (x W^T) * scale + b, with
    `x` rounded to 8 bits first where `activations` is "int8"."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        *,
        activations: str = DEFAULT_ACTIVATIONS,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activations = check_activations(activations)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._packed: PackedWeight | None = None  # fbgemm's prepacked weight, built on first eager use

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, activations: str = DEFAULT_ACTIVATIONS) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None, weight.device, activations=activations
        )
        module.weight.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _use_fbgemm(self, x: torch.Tensor) -> bool:
        return (
            self.activations == "int8"
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and "fbgemm" in torch.backends.quantized.supported_engines
            and (self._packed is not None or not torch.compiler.is_compiling())  # packing is not traceable
        )

    def _fbgemm_weight(self) -> PackedWeight:
        if self._packed is None:
            torch_internals.require(torch_internals.INT8_CPU)
            bias = None if self.bias is None else self.bias.detach().float()
            with warnings.catch_warnings():  # quantized tensors are deprecated, but fbgemm's packing takes one
                warnings.simplefilter("ignore", UserWarning)
                self._packed = PackedWeight(torch_internals.fbgemm_pack_int8(self.weight, self.weight_scale, bias))
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_rows_kernel(x):  # a decode step's rows (with "int8", fbgemm's numerics exactly)
            y = self.rows_products(x, [self])
        elif self._use_fbgemm(x):
            return fbgemm_int8_linear(x, self._fbgemm_weight(), self.out_features)
        else:
            y = self._float_linear(round_activations(x) if self.activations == "int8" else x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    @staticmethod
    def rows_products(x: torch.Tensor, linears: Sequence["Int8Linear"]) -> torch.Tensor:
        """The products of `linears` (one activations mode) on `x`'s decode rows, side by side, without biases:
        `int8_rows_linear` with "int8", else the weight-only `rows_linear`."""
        kernel = int8_rows_linear if linears[0].activations == "int8" else rows_linear
        return kernel(x, [linear.weight for linear in linears], [linear.weight_scale.to(x.dtype) for linear in linears])

    def _float_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (W_int8 * scale)^T with `x` as given (weight-only, or already rounded where fbgemm cannot run), for
        more rows than the rows kernels take or where they cannot be built."""
        scale = self.weight_scale.to(x.dtype)
        if use_reduction(x):
            return reduction_linear(x, self.weight) * scale
        if x.device.type == "cpu" and x.numel() == x.shape[-1] and torch_internals.available(INT8PACK_CPU):
            return torch_internals.int8pack_mm(x.reshape(1, -1), self.weight, scale).view(*x.shape[:-1], -1)
        if x.device.type == "cpu" and x.dtype == torch.float32 and use_onednn(x, self.weight):
            return onednn_linear(x, self.weight * scale[:, None])  # the dequantized weight: one pass, none over y
        return nn.functional.linear(x, self.weight.to(x.dtype)) * scale

    @staticmethod
    def joint_forward(x: torch.Tensor, linears: Sequence["Int8Linear"]) -> tuple[torch.Tensor, ...]:
        """Each of `linears` on `x` (`modeling_llama2.joint_products`): decode rows in one rows-kernel call for all
        of them where they round activations alike (with "int8" the same x gives each the same rounding, so the
        outputs are theirs one by one, bit for bit), other rows one product each."""
        if len({linear.activations for linear in linears}) > 1 or not may_join(x, linears):
            return tuple(linear(x) for linear in linears)
        return split_products(Int8Linear.rows_products(x, linears), linears)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": None}  # a copy or a pickle packs its own on first use

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = None  # new weights: repack on next use
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"activations={self.activations!r}"
        )


def replace_linears(model: nn.Module, make, names: set[str] | None = None) -> None:
    """Replace (in place) each `nn.Linear` of `model`, or those named in `names`, by `make(linear)`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (names is None or name in names):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


@torch.no_grad()
def quantize_int8(model: nn.Module, *, activations: str = DEFAULT_ACTIVATIONS) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by its int8 `Int8Linear`; embeddings and norms stay, and
    one-token attention steps take the CPU kernel on a CPU (`cpu_kernels.use_cpu_attention`). `activations`: "float"
    (weight-only) or "int8" (activations rounded too; see the module's docstring)."""
    check_activations(activations)
    replace_linears(model, lambda linear: Int8Linear.from_linear(linear, activations=activations))
    return use_cpu_attention(model)


def activations_of(model: nn.Module) -> str:
    """The `activations` mode of `model`'s `Int8Linear`s (one for all of them)."""
    modes = {m.activations for m in model.modules() if isinstance(m, Int8Linear)}
    if len(modes) != 1:
        raise ValueError(f"expected one int8 activations mode for the whole model, found {sorted(modes) or 'none'}.")
    return modes.pop()


def save_quantized(model: Llama2ForCausalLM, save_directory: str | os.PathLike) -> None:
    """Write `config.json` and the int8 weights, scales and remaining float tensors as one safetensors file, whose
    metadata records the activations mode."""
    metadata = {"format": "pt", "quantization": "int8", "activations": activations_of(model)}
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)


@torch.no_grad()
def load_quantized(
    save_directory: str | os.PathLike, device: str | torch.device = "cpu", *, activations: str | None = None
) -> Llama2ForCausalLM:
    """Rebuild the model of a `save_quantized` directory: the linears that have a `weight_scale` in the file
    become `Int8Linear`s with the activations mode it was saved with (or `activations`; a file that records none
    gets `DEFAULT_ACTIVATIONS`), and every tensor is loaded strictly."""
    path = os.path.join(save_directory, WEIGHTS_NAME)
    if activations is None:
        with safe_open(path, "pt") as f:
            activations = (f.metadata() or {}).get("activations", DEFAULT_ACTIVATIONS)
        if activations not in ACTIVATIONS:
            raise ValueError(
                f"{path} records activations={activations!r}, which is not an int8 mode: pass "
                "load_quantized(..., activations='float' or 'int8')."
            )
    check_activations(activations)
    config = Llama2Config.from_pretrained(save_directory)
    state = load_file(path, device=str(device))
    quantized = {key.removesuffix(".weight_scale") for key in state if key.endswith(".weight_scale")}
    with torch.device(device):
        model = Llama2ForCausalLM(config)
    replace_linears(
        model,
        lambda m: Int8Linear(m.in_features, m.out_features, m.bias is not None, device, activations=activations),
        quantized,
    )
    model.load_state_dict(state, strict=True)
    return model.eval()

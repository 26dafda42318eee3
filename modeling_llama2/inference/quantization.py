"""Weight-only int8 linear layers: each `nn.Linear` weight becomes int8 with one fp32 scale per output channel
(symmetric, absmax / 127), saved and loaded through safetensors under the original parameter names plus a
`weight_scale` beside each quantized `weight`.

Decoding reads every weight once per token, so a quarter of the bytes is up to four times the speed. Kernels,
measured on this project's 2-core x86 CPU (torch 2.13, fp32 GEMV 32000x768 as 1x):
- fbgemm's dynamic int8 linear (`torch.ops.quantized.linear_dynamic`, prepacked weights): 3-16x faster. It
  also rounds the activations to 8 bits per tensor at run time, which the logit-error test bounds.
- `torch.ops.aten._weight_int8pack_mm`: about 2-30x slower. Dequantize-then-matmul: about 5x slower eager and
  still about 10x slower under `torch.compile`.
So on a CPU, inside `torch.compile` and for one row (batch-1 decoding), the product is
`cpu_kernels.reduction_linear`, one compiled loop that reads the int8 weight and converts it as it goes (weight-only
int8: the activations are not rounded, so these logits are closer to fp32 than fbgemm's); for more rows, or eagerly,
fbgemm is called (through `cpu_kernels`' custom op; the private torch APIs are `torch_internals`'); elsewhere it
computes `linear(x, int8 -> dtype) * scale`, which
inductor fuses into one weight-streaming kernel on GPUs.
"""

import os
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import torch_internals
from ..configuration_llama2 import Llama2Config
from ..modeling_llama2 import Llama2ForCausalLM
from .cpu_kernels import PackedWeight, fbgemm_int8_linear, reduction_linear, use_reduction

WEIGHTS_NAME = "model.int8.safetensors"


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 weight and a per-output-channel fp32 `weight_scale`: y = (x W^T) * scale + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self._packed: PackedWeight | None = None  # fbgemm's prepacked weight, built on first eager use

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device)
        module.weight.copy_(torch.round(weight / scale[:, None]).clamp(-127, 127))
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _use_fbgemm(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
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
        if use_reduction(x):
            y = reduction_linear(x, self.weight) * self.weight_scale.to(x.dtype)
        elif self._use_fbgemm(x):
            return fbgemm_int8_linear(x, self._fbgemm_weight(), self.out_features)
        else:
            y = nn.functional.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_packed": None}  # a copy or a pickle packs its own on first use

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._packed = None  # new weights: repack on next use
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def replace_linears(model: nn.Module, make, names: set[str] | None = None) -> None:
    """Replace (in place) each `nn.Linear` of `model`, or those named in `names`, by `make(linear)`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and (names is None or name in names):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(module))


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` of `model` (in place) by its int8 `Int8Linear`; embeddings and norms stay."""
    replace_linears(model, Int8Linear.from_linear)
    return model


def save_quantized(model: Llama2ForCausalLM, save_directory: str | os.PathLike) -> None:
    """Write `config.json` and the int8 weights, scales and remaining float tensors as one safetensors file."""
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt", "quantization": "int8"})


@torch.no_grad()
def load_quantized(save_directory: str | os.PathLike, device: str | torch.device = "cpu") -> Llama2ForCausalLM:
    """Rebuild the model of a `save_quantized` directory: the linears that have a `weight_scale` in the file
    become `Int8Linear`s, and every tensor is loaded strictly."""
    config = Llama2Config.from_pretrained(save_directory)
    state = load_file(os.path.join(save_directory, WEIGHTS_NAME), device=str(device))
    quantized = {key.removesuffix(".weight_scale") for key in state if key.endswith(".weight_scale")}
    with torch.device(device):
        model = Llama2ForCausalLM(config)
    replace_linears(
        model, lambda m: Int8Linear(m.in_features, m.out_features, m.bias is not None, device=device), quantized
    )
    model.load_state_dict(state, strict=True)
    return model.eval()

"""Inference speed-ups: a static-cache decode loop with one compiled step (`decoding`), CPU kernels chosen per
linear layer (`cpu_kernels`) and weight-only int8 linear layers (`quantization`)."""

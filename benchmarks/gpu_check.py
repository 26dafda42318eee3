"""The CUDA paths, checked and timed on one GPU in a few minutes (CI has no GPU; run this by hand on one).

    python benchmarks/gpu_check.py [--rounds 5] [--new-tokens 128]

Checks, each printed as a line: parity with transformers' `LlamaForCausalLM` (fp32 logits, bf16 greedy tokens with
left padding) for every attention implementation the registry offers here; the routed static cache (greedy, seeded
sampling); the compiled `decoding.generate` against `generate`; int8 weights (dequantize + `linear` inside the
compiled graph); the causal-LM loss against transformers' on bf16 logits (value, gradient, peak memory, time); an
SFT step under accelerate's FSDP (`llama2-sft --fsdp`, launched by torchrun on two GPUs when there are two or more,
else on one), with the sharding it applied. Then times bf16 decode on the 125M GQA shape against transformers'
default and static + compiled `generate`, and the same model through its routed
`generate(cache_implementation="static")`. Without a CUDA device it says so and exits (status 0): there is nothing
to check.
"""

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM

from modeling_llama2 import Llama2Config, Llama2ForCausalLM
from modeling_llama2.inference import decoding

SMALL = dict(
    vocab_size=1000,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)
SHAPE_125M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


def pair(kwargs: dict, dtype: torch.dtype, attn: str = "sdpa") -> tuple[Llama2ForCausalLM, LlamaForCausalLM]:
    torch.manual_seed(0)
    ours = Llama2ForCausalLM(Llama2Config(**kwargs)).eval()
    ref = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    ref.load_state_dict(ours.state_dict())
    ours.set_attn_implementation(attn)
    ref.set_attn_implementation(attn)
    return ours.to("cuda", dtype), ref.to("cuda", dtype)


def check(name: str, fn) -> None:
    try:
        print(f"{name}: {fn()}", flush=True)
    except Exception as error:  # keep going: one broken path should not hide the others
        print(f"{name}: FAILED {type(error).__name__}: {error}".splitlines()[0][:400], flush=True)
        traceback.print_exc(limit=3)


def greedy(model, ids, mask, new: int, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs
    )


def parity(attn: str) -> str:
    ours, ref = pair(SMALL, torch.float32, attn)
    ids = torch.randint(3, 1000, (2, 64), device="cuda")
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    ours, ref = ours.bfloat16(), ref.bfloat16()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    same = torch.equal(greedy(ours, ids, mask, 32), greedy(ref, ids, mask, 32))
    return f"fp32 max abs logit diff {diff:.2e}; bf16 left-padded greedy tokens identical: {same}"


def static_cache() -> str:
    ours, _ = pair(SMALL, torch.bfloat16)
    ids = torch.randint(3, 1000, (2, 16), device="cuda")
    mask = torch.ones_like(ids)
    same = torch.equal(greedy(ours, ids, mask, 32), greedy(ours, ids, mask, 32, cache_implementation="static"))

    def sampled(**kwargs) -> torch.Tensor:
        torch.manual_seed(0)
        return ours.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=True, top_k=50, top_p=0.9,
            temperature=0.8, pad_token_id=0, **kwargs,
        )  # fmt: skip

    seeded = torch.equal(sampled(), sampled(cache_implementation="static"))
    return f"static cache (routed, compiled) tokens == dynamic cache tokens: greedy {same}, seeded sampling {seeded}"


def compiled_decoding() -> str:
    ours, _ = pair(SMALL, torch.float32)
    ids = torch.randint(3, 1000, (4, 16), device="cuda")
    same = torch.equal(decoding.generate(ours, ids, max_new_tokens=48), greedy(ours, ids, torch.ones_like(ids), 48))
    mask = torch.ones_like(ids)
    mask[1, :5], mask[3, :9] = 0, 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    padded = torch.equal(
        decoding.generate(ours, ids, max_new_tokens=48, attention_mask=mask), greedy(ours, ids, mask, 48)
    )
    samples = decoding.sample_n(ours, ids[:1], n=16, max_new_tokens=32, temperature=1.0)
    return (
        f"fp32 compiled greedy == generate: {same}, left-padded: {padded}; "
        f"sample_n gave {samples.unique(dim=0).shape[0]}/16 distinct"
    )


def int8() -> str:
    from modeling_llama2.inference.quantization import quantize_int8

    ours, _ = pair(SMALL, torch.float32)
    quantized = quantize_int8(copy.deepcopy(ours))
    ids = torch.randint(3, 1000, (2, 32), device="cuda")
    with torch.no_grad():
        ref, out = ours(ids).logits, quantized(ids).logits
    eager = decoding.generate(quantized, ids[:, :16], max_new_tokens=32, compile=False)
    compiled = decoding.generate(quantized, ids[:, :16], max_new_tokens=32)
    error = ((out - ref).norm() / ref.norm()).item()
    return f"int8 logit rel L2 error {error:.4f}; compiled tokens == eager: {torch.equal(eager, compiled)}"


def loss() -> str:
    from transformers.loss.loss_utils import ForCausalLMLoss

    from modeling_llama2.loss_llama2 import causal_lm_loss

    logits = torch.randn(8, 512, 32000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (8, 512), device="cuda")
    labels[:, :100] = -100
    results = {}
    for name, fn in [("transformers", ForCausalLMLoss), ("ours", causal_lm_loss)]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        value = fn(logits, labels, 32000)
        (grad,) = torch.autograd.grad(value, logits)
        seconds = timed(lambda: torch.autograd.grad(fn(logits, labels, 32000), logits), 5)
        results[name] = value, grad, (torch.cuda.max_memory_allocated() - base) / 2**20, seconds
    (ref, ref_grad, ref_mib, ref_s), (ours, ours_grad, ours_mib, ours_s) = results.values()
    return (
        f"bf16 8x512x32000 loss diff {(ours - ref).abs().item():.1e}, grad max diff "
        f"{(ours_grad.float() - ref_grad.float()).abs().max().item():.1e}; peak MiB ours {ours_mib:.0f} vs "
        f"{ref_mib:.0f}; ms ours {ours_s * 1e3:.1f} vs {ref_s * 1e3:.1f}"
    )


def timed(fn, rounds: int) -> float:
    fn()  # warm-up and compile
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(rounds: int, new: int) -> None:
    ours, ref = pair(SHAPE_125M, torch.bfloat16)
    compiled = CompileConfig(fullgraph=True)
    print(
        f"\n125M GQA, bf16, {new} new tokens after a 16-token prompt, median of {rounds}; "
        f"{torch.cuda.get_device_name()}"
    )
    print("| batch | variant | tok/s | vs transformers |\n| ---: | --- | ---: | ---: |")
    for batch in (1, 8):
        ids = torch.randint(3, 32000, (batch, 16), device="cuda")
        mask = torch.ones_like(ids)
        variants = {
            "transformers generate": lambda: greedy(ref, ids, mask, new, min_new_tokens=new),
            "transformers static + compiled": lambda: greedy(
                ref, ids, mask, new, min_new_tokens=new, cache_implementation="static", compile_config=compiled
            ),
            "ours generate, static (routed)": lambda: greedy(
                ours, ids, mask, new, min_new_tokens=new, cache_implementation="static"
            ),
            "ours decoding.generate": lambda: decoding.generate(ours, ids, max_new_tokens=new, max_cache_len=16 + new),
        }
        base = None
        for name, fn in variants.items():
            try:
                seconds = timed(fn, rounds)
            except Exception as error:
                print(f"| {batch} | {name} | FAILED {type(error).__name__}: {str(error)[:200]} | |", flush=True)
                continue
            base = base or seconds
            print(f"| {batch} | {name} | {batch * new / seconds:.0f} | {base / seconds:.2f} |", flush=True)


REPO = Path(__file__).resolve().parents[1]


def fsdp_sft_command(devices: int, *, model: str, data: str, output_dir: str, report_dir: str) -> list[str]:
    """The FSDP check's launch: torchrun with one rank per GPU, two where there are two or more (sharding across
    devices), else one (FSDP still wraps and shards, over one rank), each running `fsdp_worker` over `llama2-sft`'s
    command line with `--fsdp` (accelerate's FSDP2: full shard, each decoder layer wrapped)."""
    if devices < 1:
        raise ValueError("the FSDP check needs a CUDA device")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(min(devices, 2)),
        __file__, "--fsdp-worker", report_dir, "--model", model, "--train-file", data, "--output-dir", output_dir,
        "--fsdp", "--max-steps", "2", "--max-length", "128", "--per-device-train-batch-size", "2",
        "--learning-rate", "1e-3", "--logging-steps", "1", "--save-strategy", "no", "--report-to", "none",
    ]  # fmt: skip


def fsdp_worker(report_dir: str, argv: list[str]) -> None:
    """One rank of the FSDP check: `llama2-sft`'s `main(argv)`, with `Trainer.train` wrapped to write, once trained,
    what accelerate applied: its distributed type, how many decoder layers FSDP wrapped, and this rank's share of
    their weights."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import Trainer

    from modeling_llama2.alignment.sft import main as sft_main
    from modeling_llama2.modeling_llama2 import Llama2DecoderLayer

    train = Trainer.train

    def reported(self, *args, **kwargs):
        output = train(self, *args, **kwargs)
        layers = [m for m in self.model_wrapped.modules() if isinstance(m, Llama2DecoderLayer)]
        weights = [p for layer in layers for p in layer.parameters()]
        report = {
            "distributed_type": self.accelerator.distributed_type.value,
            "layers": len(layers),
            "wrapped": sum(isinstance(layer, FSDPModule) for layer in layers),
            "sharded": all(isinstance(p, DTensor) for p in weights),
            "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in weights),
            "full": sum(p.numel() for p in weights),
        }
        Path(report_dir, f"rank-{os.environ.get('RANK', 0)}.json").write_text(json.dumps(report))
        return output

    Trainer.train = reported
    sft_main(argv)


def fsdp_sft() -> str:
    """An SFT step of the tests' tiny model under FSDP, launched as `fsdp_sft_command` says; fails unless every rank
    ran FSDP with every decoder layer wrapped and the ranks' shares of the weights add up to the whole."""
    sys.path.insert(0, str(REPO))  # the tests' tiny model, tokenizer and data: no download
    from tests.alignment_helpers import qa_pairs, save_causal_lm, write_jsonl

    devices = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "reports").mkdir()
        model = save_causal_lm(tmp / "model")
        data = write_jsonl(tmp / "sft.jsonl", [{"prompt": q, "response": a} for q, a in qa_pairs(32)])
        command = fsdp_sft_command(
            devices, model=str(model), data=str(data), output_dir=str(tmp / "out"), report_dir=str(tmp / "reports")
        )
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"exit status {result.returncode}: {result.stderr[-3000:]}")
        reports = [json.loads(path.read_text()) for path in sorted((tmp / "reports").glob("rank-*.json"))]
        state = json.loads((tmp / "out" / "trainer_state.json").read_text())
    first = reports[0]
    if not all(r["distributed_type"] == "FSDP" and r["sharded"] and r["wrapped"] == r["layers"] > 0 for r in reports):
        raise RuntimeError(f"FSDP was not applied as asked: {reports}")
    if sum(r["local"] for r in reports) != first["full"]:
        raise RuntimeError(f"the ranks' shares of the weights do not add up to the whole: {reports}")
    losses = [f"{entry['loss']:.3f}" for entry in state["log_history"] if "loss" in entry]
    return (
        f"{len(reports)} rank(s) on {devices} GPU(s): FSDP, {first['wrapped']}/{first['layers']} decoder layers "
        f"wrapped, each rank holding {first['local'] / first['full']:.0%} of their weights; step losses {losses}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--fsdp-worker"]:
        fsdp_worker(argv[1], argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--only", default="parity,static,decoding,int8,loss,fsdp,speed", help="comma-separated subset")
    args = parser.parse_args(argv)
    only = args.only.split(",")
    if not torch.cuda.is_available():
        print(f"gpu_check.py checks the CUDA paths, and torch {torch.__version__} sees no CUDA device here: nothing to "
              "check; run it on a GPU machine.", file=sys.stderr)  # fmt: skip
        return
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    if "parity" in only:
        for attn in ("eager", "sdpa", "flex_attention", "flash_attention_2"):
            check(f"parity {attn}", lambda: parity(attn))
    checks = {"static": static_cache, "decoding": compiled_decoding, "int8": int8, "loss": loss, "fsdp": fsdp_sft}
    for name, fn in checks.items():
        if name in only:
            check(name, fn)
    if "speed" in only:
        speed(args.rounds, args.new_tokens)


if __name__ == "__main__":
    main()

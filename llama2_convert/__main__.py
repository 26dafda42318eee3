"""`llama2-convert` / `python -m llama2_convert`: Meta and llama2.c checkpoints to Hugging Face and back."""

from __future__ import annotations

import argparse
import signal
import sys

from . import ConversionError


def _option(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--some-name`, also spelled `--some_name` as transformers' old script had it."""
    spellings = [name] + (["--" + name[2:].replace("-", "_")] if "-" in name[2:] else [])
    parser.add_argument(*spellings, dest=name[2:].replace("-", "_"), **kwargs)


def _writer_options(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "--output-dir",
        required=True,
        help="Folder to create; written to a temporary folder beside it, renamed at the end.",
    )
    _option(
        parser,
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="Weight dtype (default: as stored in the checkpoint).",
    )
    _option(
        parser, "--max-shard-size", default="5GB", help="Largest safetensors file, e.g. 5GB or 500MiB (default: 5GB)."
    )
    _option(parser, "--tokenizer", help="tokenizer.model (default: one in or above the input folder).")
    _option(parser, "--overwrite", action="store_true", help="Replace a non-empty --output-dir.")
    _option(
        parser,
        "--model-type",
        choices=["llama", "llama2"],
        default="llama",
        help="llama (default): a stock transformers Llama checkpoint that every Llama tool reads; llama2: this "
        "package's own type (auto_map and its source files beside the weights), loaded by AutoModelForCausalLM "
        "as this package's model, with trust_remote_code=True where the package is not installed.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama2-convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    meta = commands.add_parser("meta-to-hf", help="Meta's consolidated.*.pth + params.json -> Hugging Face folder.")
    _option(meta, "--input-dir", required=True, help="Meta's checkpoint folder, e.g. llama-2-13b/.")
    _writer_options(meta)
    _option(meta, "--max-position-embeddings", type=int, default=4096, help="Context length (default: Llama 2's 4096).")
    _option(
        meta,
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="Write the Llama 2 chat template (default: if the folder name contains 'chat').",
    )
    _option(meta, "--skip-checksum", action="store_true", help="Do not verify checklist.chk.")

    hf = commands.add_parser("hf-to-meta", help="Hugging Face folder -> Meta's consolidated.*.pth + params.json.")
    _option(hf, "--input-dir", required=True, help="Hugging Face checkpoint folder.")
    _option(hf, "--output-dir", required=True, help="Folder to create.")
    _option(hf, "--num-shards", type=int, required=True, help="Model-parallel shards: 1 for 7B, 2 for 13B, 8 for 70B.")
    _option(hf, "--tokenizer", help="tokenizer.model to write (default: the one in --input-dir).")
    _option(hf, "--no-tokenizer", action="store_true", help="Write no tokenizer.model (Meta's code needs one).")
    _option(hf, "--overwrite", action="store_true", help="Replace a non-empty --output-dir.")

    llama2c = commands.add_parser(
        "llama2c-to-hf", help="llama2.c ckpt.pt or exported .bin (version 0 or 1) -> Hugging Face folder."
    )
    _option(llama2c, "--checkpoint", required=True, help="llama2.c ckpt.pt or model.bin.")
    _writer_options(llama2c)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that the staging folder is removed on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input is one `error:` line and exit code 2, and an interruption (SIGINT, SIGTERM) leaves
    --output-dir as it was and exits 130 or 143 (128 + the signal's number, as a shell reports a killed process)."""
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    source = args.pop("checkpoint" if command == "llama2c-to-hf" else "input_dir")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        # Imported here so that `--help` answers without loading torch and transformers.
        from .llama2c import llama2c_to_hf
        from .meta import hf_to_meta, meta_to_hf

        convert = {"meta-to-hf": meta_to_hf, "hf-to-meta": hf_to_meta, "llama2c-to-hf": llama2c_to_hf}[command]
        convert(source, args.pop("output_dir"), **args)
    except ConversionError as error:
        # One line, also for the config's multi-line validation errors.
        message = " ".join(line.strip() for line in str(error).splitlines())
        print(f"llama2-convert {command}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as interruption:
        name, code = ("SIGTERM", 143) if isinstance(interruption, Terminated) else ("SIGINT", 130)
        print(f"llama2-convert {command}: interrupted by {name}; --output-dir was left as it was.", file=sys.stderr)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

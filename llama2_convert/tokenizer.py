"""Llama 2's sentencepiece `tokenizer.model` as a fast `tokenizer.json`, with the chat template for chat models.

transformers' own converter prepends the dummy-prefix space only when the text does not already
start with one and splits on spaces, so it disagrees with sentencepiece on leading and repeated
spaces. Here the prefix is a `Prepend` normalizer that always fires (as sentencepiece's
`add_dummy_prefix` does) and nothing splits the text, so BPE sees exactly what sentencepiece sees.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from modeling_llama2.chat_format import CHAT_TEMPLATE

SPACE = "\u2581"  # sentencepiece's visible space, "▁"


def build_fast_tokenizer(model_file: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece BPE model."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    _check_representable(model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # sentencepiece BPE merges the adjacent pair whose union is the best-scored piece; a BPE merge
    # list ranked by that score does the same. Bytes and special pieces never take part in merges.
    mergeable = {
        sp.id_to_piece(i): sp.get_score(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
    }
    merges = sorted(
        (
            (piece[:k], piece[k:])
            for piece in mergeable
            for k in range(1, len(piece))
            if piece[:k] in mergeable and piece[k:] in mergeable
        ),
        key=lambda pair: (-mergeable[pair[0] + pair[1]], vocab[pair[0]], vocab[pair[1]]),
    )
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    tokenizer.add_special_tokens([unk, bos, eos])
    return tokenizer


def _check_representable(model_file: str | Path) -> None:
    """Refuse models the fast tokenizer above would not reproduce, reading the model's own trainer and
    normalizer settings: Llama 2's tokenizer is BPE with byte fallback, a dummy prefix and no normalization."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        problems.append(f"model type {sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}, not BPE")
    if not trainer.byte_fallback:
        problems.append("no byte fallback")
    if normalizer.precompiled_charsmap or normalizer.name not in ("identity", ""):
        problems.append(f"normalization {normalizer.name!r} (NFKC or similar)")
    if normalizer.remove_extra_whitespaces:
        problems.append("whitespace folding")
    if not normalizer.add_dummy_prefix:
        problems.append("no dummy prefix")
    if trainer.bos_id < 0 or trainer.eos_id < 0:
        problems.append("no <s> or </s>")
    if problems:
        raise ValueError(
            f"{model_file} cannot be converted exactly: {'; '.join(problems)}. Only Llama 2-style sentencepiece "
            "models (BPE, byte fallback, dummy prefix, identity normalization, <s> and </s>) are supported."
        )


def save_tokenizer(
    model_file: str | Path, output_dir: str | Path, *, chat: bool, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Write `tokenizer.json`, `tokenizer_config.json` (with the chat template for chat models) and
    a copy of `tokenizer.model`, so the directory works with `AutoTokenizer` and with Meta's code."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(model_file),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=sp.id_to_piece(sp.unk_id()),
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE if chat else None,
    )
    tokenizer.save_pretrained(output_dir)
    Path(output_dir, "tokenizer.model").write_bytes(Path(model_file).read_bytes())
    return tokenizer


def token_config(model_file: str | Path) -> dict[str, int]:
    """The config entries a tokenizer decides: vocabulary size and the BOS/EOS ids."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    return {"vocab_size": sp.get_piece_size(), "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id()}

"""Llama 2's sentencepiece `tokenizer.model` as a fast `tokenizer.json`, with the chat template for chat models.

transformers' own converter prepends the dummy-prefix space only when the text does not already
start with one and splits on spaces, so it disagrees with sentencepiece on leading and repeated
spaces. Here the prefix is a normalizer that always fires (as sentencepiece's `add_dummy_prefix` does),
after sentencepiece's whitespace folding where the model has it (`remove_extra_whitespaces`, the default of
sentencepiece and of llama2.c's `train_vocab`), and nothing splits the text, so BPE sees exactly what
sentencepiece sees. User-defined pieces (Code Llama's `▁<PRE>`, `▁<MID>`, ...), which sentencepiece matches in
the text before any merge, are added tokens matched in the normalized text.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import sentencepiece
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from modeling_llama2.chat_format import CHAT_TEMPLATE

SPACE = "\u2581"  # sentencepiece's visible space, "▁"


def build_fast_tokenizer(model_file: str | Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece BPE model."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    proto = _check_representable(model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    user_defined = [piece.piece for piece in proto.pieces if piece.type == piece.USER_DEFINED]
    # sentencepiece BPE merges the adjacent pair whose union is the best-scored piece; a BPE merge
    # list ranked by that score does the same. Bytes, special and user-defined pieces never take part in merges.
    mergeable = {
        sp.id_to_piece(i): sp.get_score(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
        and sp.id_to_piece(i) not in user_defined
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
    fold = proto.normalizer_spec.remove_extra_whitespaces
    tokenizer.normalizer = _normalizer(fold, user_defined)
    # sentencepiece's decoder drops the dummy prefix's space, and every leading space if the model folds whitespace.
    leading = sys.maxsize if fold else 1
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", leading, 0)]
    )
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    tokenizer.add_special_tokens([unk, bos, eos])
    tokenizer.add_tokens([AddedToken(piece, normalized=True, special=False) for piece in user_defined])
    return tokenizer


def _normalizer(fold_whitespace: bool, user_defined: list[str]) -> normalizers.Normalizer:
    """sentencepiece's normalization of an identity-normalized model: optional whitespace folding, the dummy prefix,
    spaces as `▁`.

    `tokenizers` matches `normalized` added tokens against the normalized text and normalizes their own text to do
    so; the dummy prefix is therefore skipped for a text that is exactly a user-defined piece, which keeps each
    piece's pattern itself. The one difference from sentencepiece left: a whole text that is exactly such a piece
    (say the 6 characters `▁<PRE>`) gets no dummy prefix, so no `▁` token before the piece.
    """
    steps = []
    if fold_whitespace:  # only the ASCII space: sentencepiece leaves tabs and newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if user_defined:
        pieces = "|".join(re.escape(piece) for piece in user_defined)
        steps.append(normalizers.Replace(Regex(rf"\A(?!(?:{pieces})\z)"), SPACE))
    else:
        steps.append(normalizers.Prepend(SPACE))
    return normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])


def _check_representable(model_file: str | Path) -> sentencepiece_model_pb2.ModelProto:
    """The model's settings, after refusing models the fast tokenizer above would not reproduce: Llama 2's
    tokenizer is BPE with byte fallback, a dummy prefix and no normalization."""
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
    if not normalizer.add_dummy_prefix:
        problems.append("no dummy prefix")
    if trainer.treat_whitespace_as_suffix:
        problems.append("whitespace as suffix")
    if trainer.bos_id < 0 or trainer.eos_id < 0:
        problems.append("no <s> or </s>")
    if problems:
        raise ValueError(
            f"{model_file} cannot be converted exactly: {'; '.join(problems)}. Only Llama 2-style sentencepiece "
            "models (BPE, byte fallback, dummy prefix, identity normalization, <s> and </s>; whitespace folding and "
            "user-defined pieces are fine) are supported."
        )
    return proto


def save_tokenizer(
    model_file: str | Path, output_dir: str | Path, *, chat: bool, model_max_length: int
) -> PreTrainedTokenizerFast:
    """Write `tokenizer.json`, `tokenizer_config.json` (with the chat template for chat models) and
    a copy of `tokenizer.model`, so the directory works with `AutoTokenizer` and with Meta's code.

    The config names transformers' generic `TokenizersBackend` (what `PreTrainedTokenizerFast` is), which loads
    `tokenizer.json` as written; `LlamaTokenizer` would rebuild the normalizer and pre-tokenizer and differ from
    sentencepiece on leading and repeated spaces. Llama 2 has no pad token: `<unk>` pads (never produced by encoding
    with byte fallback, and not EOS, whose labels a data collator would then mask), so batching works as it is."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(model_file),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=unk,
        pad_token=unk,
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

"""The fast tokenizer built from `tokenizer.model` against sentencepiece, and the Llama 2 chat template
against Meta's `chat_completion` formatting."""

from pathlib import Path

import jinja2
import pytest
import sentencepiece
from transformers import AutoTokenizer

from llama2_convert.tokenizer import build_fast_tokenizer, save_tokenizer
from modeling_llama2.chat_format import encode_dialog, tokenizer_encoder

from .llama2_reference import CORPUS, train_sentencepiece

LLAMA2_TOKENIZER = Path(__file__).parents[2] / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer")


@pytest.fixture(scope="module", params=["trained", "llama2"])
def model_file(request, trained) -> Path:
    if request.param == "trained":
        return trained
    if not LLAMA2_TOKENIZER.exists():
        pytest.skip(f"{LLAMA2_TOKENIZER} is absent (shared data lies beside the checkout)")
    return LLAMA2_TOKENIZER


@pytest.fixture(scope="module")
def saved(model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(model_file, folder, chat=True, model_max_length=4096)
    return sentencepiece.SentencePieceProcessor(model_file=str(model_file)), AutoTokenizer.from_pretrained(folder)


def test_fast_tokenizer_matches_sentencepiece(model_file):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    fast = build_fast_tokenizer(model_file)
    texts = CORPUS + ["\n".join(CORPUS), "  ".join(CORPUS)]
    for text in texts:
        ids = sp.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert fast.decode(ids) == sp.decode(ids), text
    assert any(sp.is_byte(i) for text in texts for i in sp.encode(text))  # byte fallback was exercised


def test_saved_tokenizer_adds_bos_and_keeps_special_tokens(saved):
    sp, tokenizer = saved
    for text in CORPUS:
        assert tokenizer(text).input_ids == [sp.bos_id()] + sp.encode(text), text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.unk_id(),
    )
    assert len(tokenizer) == sp.get_piece_size() and tokenizer.model_max_length == 4096


def meta_chat_tokens(sp, dialog: list[dict]) -> list[int]:
    """Llama 2's `Llama.chat_completion` prompt encoding (llama/generation.py)."""
    if dialog[0]["role"] == "system":
        first = "<<SYS>>\n" + dialog[0]["content"] + "\n<</SYS>>\n\n" + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": first}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"[INST] {prompt['content'].strip()} [/INST] {answer['content'].strip()} "
        tokens += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    return tokens + [sp.bos_id()] + sp.encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")


DIALOGS = {
    "single": [{"role": "user", "content": "What is a llama?"}],
    "system": [
        {"role": "system", "content": "Always answer with emojis. "},
        {"role": "user", "content": "  How to go from Beijing to NY?\n"},
    ],
    "multi-turn": [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {"role": "assistant", "content": " 1. The Eiffel Tower\n2. The Louvre  "},
        {"role": "user", "content": "What is so great about #1?"},
    ],
    "multi-turn-system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! 🦙"},
        {"role": "user", "content": "Count: 1 2 3"},
        {"role": "assistant", "content": "4 5 6"},
        {"role": "user", "content": "Café?"},
    ],
}


@pytest.mark.parametrize("dialog", DIALOGS.values(), ids=DIALOGS.keys())
def test_chat_template_matches_meta_chat_completion(saved, dialog):
    sp, tokenizer = saved
    ids = tokenizer.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]
    assert ids == meta_chat_tokens(sp, dialog)


def test_chat_template_rejects_roles_out_of_order(saved):
    _, tokenizer = saved
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(normalization="nmt_nfkc"), "normalization"),
        (dict(model_type="unigram", vocab_size=300), "not BPE"),
        (dict(add_dummy_prefix=False), "no dummy prefix"),
        (dict(remove_extra_whitespaces=True), "whitespace folding"),
    ],
)
def test_refuses_sentencepiece_models_it_cannot_reproduce(tmp_path, options, reason):
    model = train_sentencepiece(tmp_path / "other", **options)
    with pytest.raises(ValueError, match=reason):
        build_fast_tokenizer(model)


def test_small_alphabet_model_converts_exactly(tmp_path):
    """A model trained on digits and signs alone (no letters at all) is still Llama 2-style."""
    lines = [f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]
    model = train_sentencepiece(tmp_path / "digits", vocab_size=300, lines=lines, hard_vocab_limit=False)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    fast = build_fast_tokenizer(model)
    for text in ["12+7=19", " 3+4=7", "x + y", "  99+1=100\n"]:
        assert fast.encode(text, add_special_tokens=False).ids == sp.encode(text)


# Every dialog the tests know: the ones above (ending with a user turn) and the chat-format tests' ones (ending with
# an answer, as training data does).
ALL_DIALOGS = {
    **DIALOGS,
    "answered": [{"role": "user", "content": " the cat? "}, {"role": "assistant", "content": "red "}],
    "answered-system-multi-turn": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "the dog?"},
        {"role": "assistant", "content": "blue"},
    ],
}


@pytest.mark.parametrize("dialog", ALL_DIALOGS.values(), ids=ALL_DIALOGS.keys())
def test_encode_dialog_equals_the_chat_template(saved, dialog):
    """The chat format's two forms, the Jinja template and `encode_dialog`, give the same ids."""
    _, tokenizer = saved
    ids, _ = encode_dialog(dialog, tokenizer_encoder(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == tokenizer.apply_chat_template(dialog, tokenize=True, return_dict=True)["input_ids"]

import pytest

from modeling_llama2.chat_format import IGNORE_INDEX, encode_dialog, tokenizer_encoder
from tests.alignment_helpers import make_tokenizer

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def encode():
    return tokenizer_encoder(make_tokenizer())


def test_single_turn_matches_meta_reference(encode):
    ids, labels = encode_dialog(
        [{"role": "user", "content": " the cat? "}, {"role": "assistant", "content": "red "}], encode, BOS, EOS
    )
    assert ids == [BOS] + encode("[INST] the cat? [/INST] red ") + [EOS]
    n_prompt = 1 + len(encode("[INST] the cat? [/INST]"))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == EOS


def test_system_and_multi_turn_masking(encode):
    dialog = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "the dog?"},
        {"role": "assistant", "content": "blue"},
    ]
    ids, labels = encode_dialog(dialog, encode, BOS, EOS)
    turn1 = encode("[INST] <<SYS>>\nbe nice\n<</SYS>>\n\nthe cat? [/INST] red ")
    turn2 = encode("[INST] the dog? [/INST] blue ")
    assert ids == [BOS] + turn1 + [EOS, BOS] + turn2 + [EOS]
    # Exactly the answers and their EOS are learned: every system and user token is masked.
    learned = [token for token, label in zip(ids, labels, strict=False) if label != IGNORE_INDEX]
    assert learned == encode("red ") + [EOS] + encode("blue ") + [EOS]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=False))


def test_dialog_ending_with_user_is_a_generation_prompt(encode):
    dialog = [
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "the dog?"},
    ]
    ids, labels = encode_dialog(dialog, encode, BOS, EOS)
    first_turn = [BOS] + encode("[INST] the cat? [/INST] red ") + [EOS]
    assert ids == first_turn + [BOS] + encode("[INST] the dog? [/INST]")
    assert labels[len(first_turn) :] == [IGNORE_INDEX] * (len(ids) - len(first_turn))


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([{"role": "assistant", "content": "hi"}], "Roles must be"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "Roles must be"),
        ([{"role": "system", "content": "a"}], "followed by a user message"),
        ([{"role": "user"}], "Each message must be"),
        ([{"role": "user", "content": "[INST] sneaky"}], r"may not contain \[INST\]"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "ok </s><s> more"}], "contain <s> </s>"),
        ([{"role": "system", "content": "an <unk>"}, {"role": "user", "content": "a"}], "may not contain <unk>"),
        ([], "Roles must be"),
    ],
)
def test_bad_dialogs_are_refused(encode, dialog, message):
    with pytest.raises(ValueError, match=message):
        encode_dialog(dialog, encode, BOS, EOS)

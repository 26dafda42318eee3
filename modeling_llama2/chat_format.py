"""The Llama 2-Chat prompt format, written once: its tags, the Jinja chat template that `apply_chat_template` and
`pipeline(messages)` render, and `encode_dialog`, which builds the same ids with loss labels for training.

Both follow `chat_completion` in Meta's reference code token for token. A completed turn is
`[BOS] + encode(f"[INST] {user} [/INST] {answer} ") + [EOS]`; a system message is folded into the first user message
as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; a dialog that ends with a user message ends with
`[BOS] + encode(f"[INST] {user} [/INST]")`, the prompt the model answers. `encode_dialog` adds the special tokens by
id, never spelled in text.

Message content may contain neither the tags (Meta refuses them too) nor Llama 2's control tokens spelled as text
(`<s>`, `</s>`, `<unk>`): both forms refuse such a message and name what it contains. Meta's code would encode
`<s>` as its literal text, but the template cannot: it spells its own BOS and EOS as text, and a fast tokenizer
parses that text, in content as well, into control tokens, so `hi </s><s>[INST] ...` would forge a turn.
"""

from collections.abc import Callable, Mapping, Sequence

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
TAGS = (B_INST, E_INST, B_SYS.strip(), E_SYS.strip())
CONTROL_TOKENS = ("<s>", "</s>", "<unk>")  # Llama 2's sentencepiece control pieces (BOS, EOS, unknown)
FORBIDDEN = TAGS + CONTROL_TOKENS  # what message content may not contain
CONTENT_ERROR = (
    "Message content may not contain {}: the chat format's tags and the control tokens <s>, </s>, <unk> would change "
    "the dialog's structure. Remove it from the data."
)
IGNORE_INDEX = -100  # label of tokens the loss skips (PyTorch's cross-entropy default `ignore_index`)


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("\n", "\\n").replace("'", "\\'") + "'"


# The same format as a Jinja template, for transformers' `apply_chat_template`. The `<s>`/`</s>` are the tokenizer's
# special tokens (`bos_token`, `eos_token`), and the text after each of them gets sentencepiece's dummy prefix space.
# `{% generation %}` marks what `encode_dialog` trains on, the answer and its EOS, for `return_assistant_tokens_mask`.
_ERROR_BEFORE, _ERROR_AFTER = CONTENT_ERROR.split("{}")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    f"{{% for forbidden in [{', '.join(map(_jinja_string, FORBIDDEN))}] %}}"
    "{% if forbidden in message['content'] %}"
    f"{{{{ raise_exception({_jinja_string(_ERROR_BEFORE)} + forbidden + {_jinja_string(_ERROR_AFTER)}) }}}}"
    "{% endif %}"
    "{% endfor %}"
    "{% endfor %}"
    "{% if messages[0]['role'] == 'system' %}"
    f"{{% set system = {_jinja_string(B_SYS)} + messages[0]['content'] + {_jinja_string(E_SYS)} %}}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Roles must alternate user/assistant/user/..., after an optional system message.') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = (system + message['content']) if loop.first else message['content'] %}"
    f"{{{{ bos_token + {_jinja_string(B_INST + ' ')} + content | trim + {_jinja_string(' ' + E_INST)} }}}}"
    "{% else %}"
    "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
)


Encode = Callable[[str], list[int]]
Message = Mapping[str, str]


def tokenizer_encoder(tokenizer) -> Encode:
    """String in, ids out, with no special tokens: the contract `encode_dialog` needs, for a transformers tokenizer."""
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_dialog(messages: Sequence[Message], encode: Encode, bos_id: int, eos_id: int) -> tuple[list[int], list[int]]:
    """Token ids of a dialog in the Llama 2 chat format and its labels: -100 on every system and user token (and on
    each BOS), the token itself on each answer token and on the EOS that closes the answer.

    `messages` are `{"role", "content"}` with roles `system` (optional, first), then `user` and `assistant`
    alternating, starting with `user`; a content with a tag or a control token (`FORBIDDEN`) is refused.
    """
    messages = _fold_system(messages)
    ids, labels = [], []
    for i in range(0, len(messages), 2):
        prompt = f"{B_INST} {messages[i]['content'].strip()} {E_INST}"
        if i + 1 == len(messages):  # final user turn: the prompt to answer
            turn = [bos_id] + encode(prompt)
            ids += turn
            labels += [IGNORE_INDEX] * len(turn)
            break
        turn = encode(f"{prompt} {messages[i + 1]['content'].strip()} ")
        # Meta encodes prompt and answer as one string; the prompt's own encoding is a prefix of it for
        # sentencepiece (no piece spans the space after `[/INST]`), so its length marks where the answer starts.
        n_prompt = _common_prefix_length(turn, encode(prompt))
        ids += [bos_id] + turn + [eos_id]
        labels += [IGNORE_INDEX] * (1 + n_prompt) + turn[n_prompt:] + [eos_id]
    return ids, labels


def forbidden_in(text: str) -> list[str]:
    """The tags and control tokens `text` holds: message content with any of them is refused."""
    return [forbidden for forbidden in FORBIDDEN if forbidden in text]


def _fold_system(messages: Sequence[Message]) -> list[dict]:
    """Check roles and contents, and merge a leading system message into the first user message."""
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f'Each message must be {{"role": ..., "content": "<text>"}}, got {message!r}.')
        found = forbidden_in(message["content"])
        if found:
            raise ValueError(f"{CONTENT_ERROR.format(' '.join(found))} Content: {message['content'][:80]!r}")
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ValueError("A system message must be followed by a user message.")
        system, first = messages[0]["content"], messages[1]["content"]
        messages = [{"role": messages[1]["role"], "content": B_SYS + system + E_SYS + first}] + messages[2:]
    roles = [m["role"] for m in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(roles))]
    if not roles or roles != expected:
        raise ValueError(
            f"Roles must be an optional 'system', then 'user' and 'assistant' alternating from 'user'; got {roles}."
        )
    return messages


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n

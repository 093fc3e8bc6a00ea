"""Prompt rendering: the ONE place that turns a Conversation into token ids and labels.

Training (train_sft.py, train_rm.py) and inference (generate.py) both call this module, so the prompt a
model sees when it answers is, token for token, the prompt it was trained on up to the reply.

A template describes each turn as a prompt part and a reply part; each part is a list of pieces, a piece
being text (tokenized without special tokens) or literal token ids. Labels cover the reply parts (the
reply and the token that ends it); truncation keeps whole turns.
"""

from __future__ import annotations

from dataclasses import dataclass

from component.data.conversation import Conversation, Turn

IGNORE_INDEX = -100
Piece = str | list[int]

# Baichuan-13B-Chat / Baichuan2-Chat role tokens (<reserved_102>/<reserved_103>, <reserved_106>/<reserved_107>).
BAICHUAN_USER_TOKEN_ID = 195
BAICHUAN_ASSISTANT_TOKEN_ID = 196


@dataclass
class TurnParts:
    prompt: list[Piece]
    reply: list[Piece]


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


class Template:
    """Base class: subclasses say how one conversation splits into prompt and reply parts."""

    name = "base"
    stop_strings: tuple[str, ...] = ()  # text that also ends a reply at generation time

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"template '{self.name}' needs a tokenizer with an EOS token; this one has none")
        self.eos_id: int = tokenizer.eos_token_id

    # --- what subclasses provide ------------------------------------------------------------------
    def turn_parts(self, conversation: Conversation) -> list[TurnParts]:
        raise NotImplementedError

    @property
    def stop_token_ids(self) -> list[int]:
        """Tokens that end a reply at generation time."""
        return [self.eos_id]

    # --- shared machinery -------------------------------------------------------------------------
    def _tokenize_pieces(self, parts_per_item: list[list[list[Piece]]]) -> list[list[list[int]]]:
        """Tokenize every text piece of a batch in one tokenizer call, keep literal ids as they are."""
        texts = [piece for item in parts_per_item for part in item for piece in part if isinstance(piece, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        result = []
        for item in parts_per_item:
            item_ids = []
            for part in item:
                ids: list[int] = []
                for piece in part:
                    ids.extend(next(encoded) if isinstance(piece, str) else piece)
                item_ids.append(ids)
            result.append(item_ids)
        return result

    def encode_batch(
        self, conversations: list[Conversation], max_seq_length: int, train_on_prompt: bool = False
    ) -> list[EncodedExample | None]:
        """Token ids and labels for each conversation; None where no label token survives truncation."""
        flat_parts = []
        for conversation in conversations:
            parts = []
            for turn in self.turn_parts(conversation):
                parts += [turn.prompt, turn.reply]
            flat_parts.append(parts)
        return [
            build_example(ids[0::2], ids[1::2], max_seq_length, train_on_prompt)
            for ids in self._tokenize_pieces(flat_parts)
        ]

    def encode(self, conversation: Conversation, max_seq_length: int, train_on_prompt: bool = False):
        return self.encode_batch([conversation], max_seq_length, train_on_prompt)[0]

    def encode_turns(self, conversation: Conversation) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, reply ids) per turn, untruncated."""
        parts = [part for turn in self.turn_parts(conversation) for part in (turn.prompt, turn.reply)]
        ids = self._tokenize_pieces([parts])[0]
        return list(zip(ids[0::2], ids[1::2]))

    def encode_prompt(self, history: list[Turn], query: str, system: str | None = None) -> list[int]:
        """The generation prompt: history turns in full, then the new query's prompt part."""
        turns = self.encode_turns(Conversation([*history, Turn(query, "")], system=system))
        ids = [token for prompt, reply in turns[:-1] for token in prompt + reply]
        return ids + turns[-1][0]

    def render(self, conversation: Conversation) -> str:
        """The training text of a conversation, as the tokenizer decodes it (special tokens shown)."""
        ids = [token for prompt, reply in self.encode_turns(conversation) for token in prompt + reply]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def jinja_chat_template(self) -> str:
        """This template as a Jinja chat template (messages -> text) for runtimes that render prompts themselves
        (llama.cpp, Ollama, transformers' apply_chat_template). The text is the same as ours; its tokens are
        too when no token spans a piece boundary (true for the templates here and their tokenizers' special
        tokens)."""
        raise NotImplementedError


def build_example(
    prompts: list[list[int]], replies: list[list[int]], max_seq_length: int, train_on_prompt: bool
) -> EncodedExample | None:
    """Concatenate turns, keeping whole turns; cut inside a turn only when the first alone is too long."""
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for index, (prompt, reply) in enumerate(zip(prompts, replies)):
        if len(input_ids) + len(prompt) + len(reply) > max_seq_length:
            truncated = True
            if index == 0:  # the first turn alone does not fit: keep its head
                input_ids = (prompt + reply)[:max_seq_length]
                labels = ((prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + reply)[:max_seq_length]
            break
        input_ids += prompt + reply
        labels += (prompt if train_on_prompt else [IGNORE_INDEX] * len(prompt)) + reply
    if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never predicted
        return None
    return EncodedExample(input_ids, labels, truncated)


class HumanAssistantTemplate(Template):
    """The original project's format: `<s>Human: {q}\\n\\nAssistant: {a}</s>Human: ...`.

    BOS once, from the tokenizer (none if it has none); EOS after every reply. A system prompt, when a
    conversation has one, goes right after BOS followed by a blank line.
    """

    name = "human_assistant"
    # A base model that has not learned EOS yet runs on into an invented next turn: cut it there.
    stop_strings = ("\nHuman:",)

    def turn_parts(self, conversation: Conversation) -> list[TurnParts]:
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        parts = []
        for index, turn in enumerate(conversation.turns):
            prompt: list[Piece] = []
            if index == 0:
                prompt.append(bos)
                if conversation.system:
                    prompt.append(conversation.system + "\n\n")
            prompt.append(f"Human: {turn.user}\n\nAssistant: ")
            parts.append(TurnParts(prompt, [turn.assistant, [self.eos_id]]))
        return parts

    def jinja_chat_template(self) -> str:
        return (
            "{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
            "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n\\nAssistant: ' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
        )


class BaichuanChatTemplate(Template):
    """Baichuan-13B-Chat / Baichuan2-Chat: [195] user [196] reply </s>, per turn; the system text leads."""

    name = "baichuan_chat"

    def turn_parts(self, conversation: Conversation) -> list[TurnParts]:
        parts = []
        for index, turn in enumerate(conversation.turns):
            prompt: list[Piece] = [conversation.system] if index == 0 and conversation.system else []
            prompt += [[BAICHUAN_USER_TOKEN_ID], turn.user, [BAICHUAN_ASSISTANT_TOKEN_ID]]
            parts.append(TurnParts(prompt, [turn.assistant, [self.eos_id]]))
        return parts

    def jinja_chat_template(self) -> str:
        user, assistant = self.tokenizer.convert_ids_to_tokens([BAICHUAN_USER_TOKEN_ID, BAICHUAN_ASSISTANT_TOKEN_ID])
        return (
            "{% for message in messages %}"
            "{% if message['role'] == 'system' %}{{ message['content'] }}"
            f"{{% elif message['role'] == 'user' %}}{{{{ '{user}' + message['content'] + '{assistant}' }}}}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
            "{% endif %}{% endfor %}"
        )


class ChatTemplate(Template):
    """The tokenizer's own chat template (Qwen, Llama 3, ...), split into turns by rendering prefixes.

    Turn i's prompt is what the template adds for user message i plus the generation prompt; its reply
    is the rest up to the end of assistant message i, including the template's end-of-turn marker.
    """

    name = "chat_template"

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat_template' needs a tokenizer with a chat template; this one has none "
                "(choose 'human_assistant' or 'baichuan_chat')"
            )

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def turn_parts(self, conversation: Conversation) -> list[TurnParts]:
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        done = ""  # the system message, if any, becomes part of the first prompt
        parts = []
        for turn in conversation.turns:
            messages.append({"role": "user", "content": turn.user})
            asked = self._render(messages, True)
            messages.append({"role": "assistant", "content": turn.assistant})
            answered = self._render(messages, False)
            if not asked.startswith(done) or not answered.startswith(asked):
                raise ValueError(
                    "template 'chat_template': this tokenizer's chat template rewrites earlier turns when a "
                    "turn is added, so the reply spans cannot be found; use 'human_assistant' instead"
                )
            parts.append(TurnParts([asked[len(done) :]], [answered[len(asked) :]]))
            done = answered
        return parts

    def jinja_chat_template(self) -> str:
        return self.tokenizer.chat_template

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS plus the first token of the template's end-of-turn marker (e.g. <|im_end|>)."""
        marker = self.turn_parts(Conversation([Turn("x", "y")]))[0].reply[0]
        suffix = marker[marker.index("y") + 1 :] if "y" in marker else ""
        ids = self.tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix.strip() else []
        return list(dict.fromkeys([self.eos_id, *ids[:1]]))


TEMPLATE_CLASSES = {cls.name: cls for cls in (HumanAssistantTemplate, ChatTemplate, BaichuanChatTemplate)}


def get_template(name: str, tokenizer) -> Template:
    if name not in TEMPLATE_CLASSES:
        raise ValueError(f"unknown template '{name}'; valid: {', '.join(TEMPLATE_CLASSES)}")
    return TEMPLATE_CLASSES[name](tokenizer)

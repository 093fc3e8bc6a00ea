"""Prompt rendering and label masks: exact text, exact label tokens, whole-turn truncation."""

from __future__ import annotations

import pytest

from component.data.conversation import Conversation, Turn
from component.data.template import (
    BAICHUAN_ASSISTANT_TOKEN_ID,
    BAICHUAN_USER_TOKEN_ID,
    IGNORE_INDEX,
    build_example,
    get_template,
)

SINGLE = Conversation([Turn("把 4071 逐位写成汉字", "四零七一")])
MULTI = Conversation(
    [
        Turn("你好，请介绍一下你自己。", "我是一个乐于助人的助手。"),
        Turn("What is 2+2?", "2+2 equals 4."),
        Turn("谢谢！", "不客气。"),
    ]
)


def label_spans(labels: list[int]) -> list[list[int]]:
    """Maximal runs of trained label tokens."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    if current:
        spans.append(current)
    return spans


@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single", "multi"])
def test_human_assistant_renders_the_original_format(demo_tokenizer, conversation):
    template = get_template("human_assistant", demo_tokenizer)
    expected = "<s>" + "".join(f"Human: {t.user}\n\nAssistant: {t.assistant}</s>" for t in conversation.turns)
    assert template.render(conversation) == expected
    example = template.encode(conversation, max_seq_length=1024)
    assert demo_tokenizer.decode(example.input_ids, skip_special_tokens=False) == expected
    assert example.input_ids.count(demo_tokenizer.bos_token_id) == 1 and example.input_ids[0] == 1


@pytest.mark.parametrize("name", ["human_assistant", "chat_template", "baichuan_chat"])
@pytest.mark.parametrize("conversation", [SINGLE, MULTI], ids=["single", "multi"])
def test_labels_are_exactly_the_replies_and_their_end_token(demo_tokenizer, name, conversation):
    template = get_template(name, demo_tokenizer)
    example = template.encode(conversation, max_seq_length=1024)
    assert len(example.labels) == len(example.input_ids)
    spans = label_spans(example.labels)
    assert len(spans) == len(conversation.turns)
    for span, turn in zip(spans, conversation.turns):
        text = demo_tokenizer.decode(span, skip_special_tokens=False)
        if name == "chat_template":
            assert text == turn.assistant + "<|im_end|>\n"
        else:
            assert text == turn.assistant + "</s>"
    # every label equals the input token at its position (no shift inside our data)
    for token, label in zip(example.input_ids, example.labels):
        assert label in (IGNORE_INDEX, token)


def test_chat_template_matches_the_tokenizers_own_rendering(demo_tokenizer):
    template = get_template("chat_template", demo_tokenizer)
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in MULTI.turns:
        messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
    conversation = Conversation(MULTI.turns, system="You are terse.")
    assert template.render(conversation) == demo_tokenizer.apply_chat_template(messages, tokenize=False)
    assert demo_tokenizer.convert_tokens_to_ids("<|im_end|>") in template.stop_token_ids


def test_baichuan_chat_uses_role_token_ids(demo_tokenizer):
    template = get_template("baichuan_chat", demo_tokenizer)
    example = template.encode(MULTI, max_seq_length=1024)
    assert example.input_ids.count(BAICHUAN_USER_TOKEN_ID) == 3
    assert example.input_ids.count(BAICHUAN_ASSISTANT_TOKEN_ID) == 3
    assert example.input_ids[0] == BAICHUAN_USER_TOKEN_ID  # no BOS in Baichuan's chat format
    assert example.input_ids.count(demo_tokenizer.eos_token_id) == 3


def test_system_prompt_follows_bos(demo_tokenizer):
    template = get_template("human_assistant", demo_tokenizer)
    text = template.render(Conversation([Turn("q", "a")], system="Be kind."))
    assert text == "<s>Be kind.\n\nHuman: q\n\nAssistant: a</s>"


def test_train_on_prompt_labels_everything(demo_tokenizer):
    template = get_template("human_assistant", demo_tokenizer)
    example = template.encode(MULTI, max_seq_length=1024, train_on_prompt=True)
    assert example.labels == example.input_ids


def test_generation_prompt_equals_training_prompt_up_to_the_reply(demo_tokenizer):
    for name in ("human_assistant", "chat_template", "baichuan_chat"):
        template = get_template(name, demo_tokenizer)
        example = template.encode(MULTI, max_seq_length=1024)
        prompt = template.encode_prompt(MULTI.turns[:2], MULTI.turns[2].user)
        assert example.input_ids[: len(prompt)] == prompt
        first_label = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX and i >= len(prompt))
        assert first_label == len(prompt), name


def test_truncation_keeps_whole_turns(demo_tokenizer):
    template = get_template("human_assistant", demo_tokenizer)
    turns = template.encode_turns(MULTI)
    two_turns = sum(len(p) + len(r) for p, r in turns[:2])
    example = template.encode(MULTI, max_seq_length=two_turns + 3)
    assert example.truncated
    assert len(example.input_ids) == two_turns
    spans = label_spans(example.labels)
    assert [demo_tokenizer.decode(s) for s in spans] == [t.assistant + "</s>" for t in MULTI.turns[:2]]


def test_first_turn_too_long_is_cut_inside_and_unlabelled_examples_are_dropped():
    prompts, replies = [[1, 10, 11, 12]], [[20, 21, 2]]
    cut = build_example(prompts, replies, max_seq_length=6, train_on_prompt=False)
    assert cut.truncated and cut.input_ids == [1, 10, 11, 12, 20, 21]
    assert cut.labels == [IGNORE_INDEX] * 4 + [20, 21]
    assert build_example(prompts, replies, max_seq_length=4, train_on_prompt=False) is None


def test_template_without_eos_is_refused(demo_tokenizer):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="EOS"):
        get_template("human_assistant", NoEos())
    with pytest.raises(ValueError, match="valid: human_assistant"):
        get_template("alpaca", demo_tokenizer)


def test_template_registry_matches_the_config_choices():
    from component.config.choices import TEMPLATES
    from component.data.template import TEMPLATE_CLASSES

    assert tuple(TEMPLATE_CLASSES) == TEMPLATES


def test_jinja_chat_template_renders_the_same_prompt(demo_tokenizer):
    """The Jinja form (written into GGUF files) gives the text, and here the ids, encode_prompt gives."""
    template = get_template("human_assistant", demo_tokenizer)
    history = [Turn("把 1234 逐位写成汉字", "一二三四")]
    messages = [{"role": "system", "content": "你是助手"}]
    messages += [{"role": "user", "content": "把 1234 逐位写成汉字"}, {"role": "assistant", "content": "一二三四"}]
    messages.append({"role": "user", "content": "把 5678 逐位写成汉字"})
    text = demo_tokenizer.apply_chat_template(messages, chat_template=template.jinja_chat_template(), tokenize=False)
    expected = template.encode_prompt(history, "把 5678 逐位写成汉字", system="你是助手")
    assert text == demo_tokenizer.decode(expected)
    assert demo_tokenizer(text, add_special_tokens=False)["input_ids"] == expected
    assert get_template("chat_template", demo_tokenizer).jinja_chat_template() == demo_tokenizer.chat_template

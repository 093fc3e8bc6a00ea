"""Field helpers shared by the SFT and preference readers: strings, histories, system prompts, chat messages.

Each helper raises `Skip` with a reason (`missing_field:x`, `bad_field:x`, `empty_prompt`, `uses_tools`, ...)
that `convert_all` counts; none of them tokenizes.
"""

from __future__ import annotations

from typing import Any

from component.data.conversation import Turn
from component.data.readers.records import Skip


def text_field(rec: dict, key: str) -> str:
    """rec[key] as a string; KeyError (-> missing_field:key) when absent."""
    v = rec[key]
    if type(v) is str:
        return v
    if v is None:
        raise Skip(f"missing_field:{key}")
    raise Skip(f"bad_field:{key}", f"expected a string, got {type(v).__name__}")


def blank(s: str) -> bool:
    return not s or s.isspace()


def join_instruction(instruction: str, inp: Any) -> str:
    """alpaca/BELLE/comparison prompt: instruction, then input on its own line when present.

    A non-string input (5, ["z"]) is a counted skip: dropping it silently would train a different prompt.
    """
    if inp is None:
        return instruction
    if type(inp) is not str:
        raise Skip("bad_field:input", f"expected a string, got {type(inp).__name__}")
    if blank(inp):
        return instruction
    if blank(instruction):
        return inp
    return f"{instruction}\n{inp}"


def alpaca_history(rec: dict) -> list[Turn]:
    """alpaca-style history [[query, answer], ...] -> turns."""
    history = rec.get("history")
    if not history:
        return []
    if type(history) is not list:
        raise Skip("bad_field:history", "expected a list of [query, answer] pairs")
    turns = []
    for pair in history:
        if type(pair) not in (list, tuple) or len(pair) != 2 or not all(type(x) is str for x in pair):
            raise Skip("bad_field:history", "expected a list of [query, answer] pairs")
        turns.append(Turn(pair[0], pair[1]))
    return turns


def optional_system(rec: dict) -> str | None:
    system = rec.get("system")
    if system is None or (type(system) is str and blank(system)):
        return None
    if type(system) is not str:
        raise Skip("bad_field:system", f"expected a string, got {type(system).__name__}")
    return system


def check_turns(turns: list[Turn]) -> None:
    for t in turns:
        if blank(t.user):
            raise Skip("empty_prompt")
        if blank(t.assistant):
            raise Skip("empty_reply")


# Speaker names -> canonical roles. "tool" covers every tool-call/tool-result role.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "function_call": "tool",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
OPENAI_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
}


def declares_tools(rec: dict) -> bool:
    """A non-empty `tools` column (list, or a JSON string as in glaive data)."""
    tools = rec.get("tools")
    if not tools:
        return False
    if type(tools) is str:
        return tools.strip() not in ("", "[]", "null", "{}")
    return True


def sharegpt_messages(messages: Any, field_name: str) -> list[tuple[str, str]]:
    if type(messages) is not list:
        raise Skip(f"bad_field:{field_name}", "expected a list of messages")
    out = []
    for m in messages:
        if type(m) is not dict:
            raise Skip(f"bad_field:{field_name}", "expected a list of messages")
        role = SHAREGPT_ROLES.get(m["from"])
        if role is None:
            raise Skip("unknown_role", f"from={m['from']!r}")
        out.append((role, m["value"] if role == "tool" else text_field(m, "value")))
    return out


def openai_messages(messages: Any, field_name: str) -> list[tuple[str, str]]:
    if type(messages) is not list:
        raise Skip(f"bad_field:{field_name}", "expected a list of messages")
    out = []
    for m in messages:
        if type(m) is not dict:
            raise Skip(f"bad_field:{field_name}", "expected a list of messages")
        role = OPENAI_ROLES.get(m["role"])
        if role is None:
            raise Skip("unknown_role", f"role={m['role']!r}")
        if role == "tool" or m.get("tool_calls") or m.get("function_call"):
            out.append(("tool", ""))
            continue
        out.append((role, text_field(m, "content")))
    return out


def split_dialogue(
    messages: list[tuple[str, str]],
    *,
    ends_with: str,
) -> tuple[str | None, list[Turn], str | None]:
    """(system, complete user/assistant turns, trailing user message or None).

    An optional leading system message, then strictly alternating user/assistant messages that
    end with `ends_with` ("assistant" for SFT, "user" for a preference prompt).
    """
    if any(role == "tool" for role, _ in messages):
        raise Skip("uses_tools")
    system = None
    start = 0
    if messages and messages[0][0] == "system":
        system = None if blank(messages[0][1]) else messages[0][1]
        start = 1
    body = messages[start:]
    if not body or body[-1][0] != ends_with:
        raise Skip("bad_turn_order", f"the conversation must end with a {ends_with} message")
    turns = []
    for i in range(0, len(body) - 1 if ends_with == "user" else len(body), 2):
        pair = body[i : i + 2]
        if len(pair) != 2 or pair[0][0] != "user" or pair[1][0] != "assistant":
            raise Skip("bad_turn_order", "messages must alternate user/assistant after an optional system")
        turns.append(Turn(pair[0][1], pair[1][1]))
    last_user = None
    if ends_with == "user":
        if len(body) % 2 != 1:
            raise Skip("bad_turn_order", "messages must alternate user/assistant after an optional system")
        last_user = body[-1][1]
    return system, turns, last_user

"""The canonical records every reader produces and every template consumes.

Readers turn a publisher's layout into these; templates turn these into token ids.
Readers never tokenize; templates never parse files.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Turn:
    """One exchange: what the user said and what the assistant replied."""

    user: str
    assistant: str


@dataclass
class Conversation:
    """An optional system prompt followed by one or more user/assistant turns."""

    turns: list[Turn]
    system: str | None = None

    def to_dict(self) -> dict:
        return {
            "system": self.system or "",
            "turns": [{"user": t.user, "assistant": t.assistant} for t in self.turns],
        }

    @classmethod
    def from_dict(cls, row: dict) -> Conversation:
        return cls(
            turns=[Turn(t["user"], t["assistant"]) for t in row["turns"]],
            system=row.get("system") or None,
        )


@dataclass
class PreferencePair:
    """A shared prompt (with earlier turns as history) and two candidate replies."""

    prompt: str
    chosen: str
    rejected: str
    history: list[Turn] = field(default_factory=list)
    system: str | None = None

    def conversation(self, reply: str) -> Conversation:
        """The conversation that ends with `reply`, as the policy would have produced it."""
        return Conversation(turns=[*self.history, Turn(self.prompt, reply)], system=self.system)

    def to_dict(self) -> dict:
        return {
            "system": self.system or "",
            "history": [{"user": t.user, "assistant": t.assistant} for t in self.history],
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
        }

    @classmethod
    def from_dict(cls, row: dict) -> PreferencePair:
        return cls(
            prompt=row["prompt"],
            chosen=row["chosen"],
            rejected=row["rejected"],
            history=[Turn(t["user"], t["assistant"]) for t in row["history"]],
            system=row.get("system") or None,
        )

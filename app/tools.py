"""Tool calls (OpenAI function calling), built on structured output.

`tool_choice` "required", or one named function: the output is held by grammar to a single
call, `{"name": ..., "arguments": {...}}`, with each tool's arguments held to its parameters
schema, so any model makes a well-formed call. "auto": the model writes freely, and its
output is read as calls when it takes one of the two forms most open models are trained to
write: a bare JSON object `{"name": ..., "arguments" or "parameters": {...}}` (Llama 3.1 and
later), or `<tool_call>{...}</tool_call>` blocks (Hermes, Qwen 2.5 and later), the text
around them kept as content. "none": the model is not shown the tools.

Streamed, a choice's text is held back while it could still be a call (`CallWatcher`), so a
stream carries the same content and calls as the plain answer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

BLOCK_OPEN, BLOCK_CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(BLOCK_OPEN) + r"(.*?)" + re.escape(BLOCK_CLOSE), re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools mean for its generation and its answer."""

    mode: Literal["auto", "forced"]
    tools: dict[str, dict[str, Any]]  # name -> parameters schema, of the tools it may call

    @property
    def call_schema(self) -> dict[str, Any]:
        """The JSON schema a forced call is held to: one of the tools, with its arguments."""
        calls, defs = [], {}
        for index, (name, parameters) in enumerate(self.tools.items()):
            arguments, tool_defs = _embeddable(parameters, f"tool{index}_")
            defs.update(tool_defs)
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return {**schema, "$defs": defs} if defs else schema

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content left and the calls in a finished output; no calls: all content."""
        calls = self._blocks(text)
        if calls:
            content = BLOCK.sub("", text).strip()
            return content or None, calls
        bare = self._call(text)
        if bare is not None:
            return None, [bare]
        return text, []

    def may_start_call(self, text: str) -> bool:
        """Whether streamed text so far could still be the start of a call."""
        head = text.lstrip()
        return not head or head.startswith(("{", BLOCK_OPEN)) or BLOCK_OPEN.startswith(head)

    def _blocks(self, text: str) -> list[ToolCall]:
        calls = [self._call(body) for body in BLOCK.findall(text)]
        return [call for call in calls if call is not None] if all(calls) else []

    def _call(self, text: str) -> ToolCall | None:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or value.get("name") not in self.tools:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            return ToolCall(value["name"], arguments)
        return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _embeddable(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A parameters schema made to sit inside the call's schema, and its definitions.

    `$ref`s such as "#/$defs/Item" (what pydantic writes for nested models) point at the
    root of the schema they are in: the definitions move to the call schema's root, renamed
    with the tool's prefix so that two tools' Items stay apart, and the references follow.
    """
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}

    def moved(node: Any) -> Any:
        if isinstance(node, list):
            return [moved(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {key: moved(value) for key, value in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            out["$ref"] = "#/$defs/" + prefix + ref.rsplit("/", 1)[1]
        return out

    body = {key: value for key, value in schema.items() if key not in ("$defs", "definitions")}
    return moved(body), {prefix + name: moved(value) for name, value in defs.items()}


def plan_tools(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any]) -> ToolPlan | None:
    """The plan for schema-checked `tools` and `tool_choice`; None when no call is possible."""
    if not tools or tool_choice == "none":
        return None
    schemas = {
        tool["function"]["name"]: tool["function"].get("parameters") or {"type": "object"}
        for tool in tools
    }
    if tool_choice == "auto":
        return ToolPlan("auto", schemas)
    if tool_choice == "required":
        return ToolPlan("forced", schemas)
    assert isinstance(tool_choice, dict)
    name = tool_choice["function"]["name"]
    return ToolPlan("forced", {name: schemas[name]})


class CallWatcher:
    """One streamed choice: passes text on, and holds back what may be a call.

    An output that may still be one bare call (it starts like JSON) is held whole. After
    that, text streams on except from a `<tool_call>` tag to the end, which waits for the
    end to be read as calls; a tail that could be the start of that tag waits to see.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""  # text not sent yet
        self.at_start = True  # nothing sent yet: the output may still be one bare call
        self.in_block = False  # a <tool_call> tag has come: the rest waits for the end

    def feed(self, text: str) -> str:
        """The text to stream now."""
        self.held += text
        if self.plan.mode == "forced" or self.in_block:
            return ""
        if self.at_start and self.plan.may_start_call(self.held):
            return ""
        self.at_start = False
        tag = self.held.find(BLOCK_OPEN)
        if tag >= 0:
            self.in_block = True
            return self._release(tag)
        return self._release(len(self.held) - _partial_tag(self.held))

    def finish(self) -> tuple[str | None, list[ToolCall]]:
        """At the end: the held text's content and calls."""
        if not self.held:
            return None, []
        return self.plan.parse(self.held)

    def _release(self, end: int) -> str:
        released, self.held = self.held[:end], self.held[end:]
        return released


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that begins the <tool_call> tag."""
    for size in range(min(len(text), len(BLOCK_OPEN) - 1), 0, -1):
        if BLOCK_OPEN.startswith(text[-size:]):
            return size
    return 0

"""Tool plans: the schema a forced call is held to, and how a free output is read as calls."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from app.chat_schemas import ChatCompletionRequest, ChatMessage
from app.tools import CallWatcher, ToolPlan, plan_tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "time"}},
]
AUTO = ToolPlan("auto", {"weather": WEATHER, "time": {"type": "object"}})


def test_tool_choice_makes_the_plan() -> None:
    assert plan_tools(TOOLS, "none") is None and plan_tools([], "auto") is None
    auto = plan_tools(TOOLS, "auto")
    assert auto == AUTO
    required = plan_tools(TOOLS, "required")
    assert required is not None and required.mode == "forced"
    assert [c["properties"]["name"] for c in required.call_schema["anyOf"]] == [
        {"const": "weather"},
        {"const": "time"},
    ]
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "weather"}})
    assert named is not None and named.call_schema["properties"]["arguments"] == WEATHER


def test_definitions_of_nested_arguments_move_to_the_call_schema() -> None:
    from llguidance import LLMatcher

    def tool_with_item(item: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
            "$defs": {"Item": item},
        }

    plan = ToolPlan(
        "forced",
        {
            "order": tool_with_item({"type": "integer"}),
            "note": tool_with_item({"type": "string"}),
        },
    )
    schema = plan.call_schema
    assert schema["$defs"] == {"tool0_Item": {"type": "integer"}, "tool1_Item": {"type": "string"}}
    refs = [c["properties"]["arguments"]["properties"]["items"]["items"] for c in schema["anyOf"]]
    assert refs == [{"$ref": "#/$defs/tool0_Item"}, {"$ref": "#/$defs/tool1_Item"}]
    assert LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema)) == ""


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            '{"name": "weather", "arguments": {"city": "Oslo"}}',
            None,
            [("weather", {"city": "Oslo"})],
        ),
        ('{"name": "time", "parameters": {}}', None, [("time", {})]),
        (
            '{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}',
            None,
            [("weather", {"city": "Rome"})],
        ),
        (
            'Checking. <tool_call>{"name": "time", "arguments": {}}</tool_call>\n'
            '<tool_call>\n{"name": "weather", "arguments": {"city": "Lima"}}\n</tool_call>',
            "Checking.",
            [("time", {}), ("weather", {"city": "Lima"})],
        ),
        ('{"name": "stocks", "arguments": {}}', '{"name": "stocks", "arguments": {}}', []),
        ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
        ("It is sunny.", "It is sunny.", []),
    ],
)
def test_outputs_are_read_as_calls_only_in_the_known_forms(
    text: str, content: str | None, calls: list[tuple[str, dict[str, Any]]]
) -> None:
    found_content, found = AUTO.parse(text)
    assert found_content == content
    assert [(call.name, json.loads(call.arguments)) for call in found] == calls
    assert len({call.id for call in found}) == len(found)


def test_a_stream_is_held_back_only_while_it_may_be_a_call() -> None:
    words = CallWatcher(AUTO)
    assert [words.feed(t) for t in [" ", "<to", "day"]] == ["", "", " <today"]
    assert words.feed(" is") == " is" and words.finish() == (None, [])
    call = CallWatcher(AUTO)
    parts = ['{"name": "time",', ' "arguments": {}}']
    assert [call.feed(t) for t in parts] == ["", ""]
    content, calls = call.finish()
    assert content is None and [c.name for c in calls] == ["time"]
    forced = CallWatcher(ToolPlan("forced", {"time": {}}))
    assert forced.feed("anything") == ""  # a forced output is a call whatever it looks like


def test_a_tool_call_block_after_text_is_held_to_the_end() -> None:
    stream = CallWatcher(AUTO)
    parts = ["Let me check. ", "<to", 'ol_call>{"name": "time", ', '"arguments": {}}</tool_call>']
    assert [stream.feed(part) for part in parts] == ["Let me check. ", "", "", ""]
    content, calls = stream.finish()
    assert content is None and [call.name for call in calls] == ["time"]
    near_miss = CallWatcher(AUTO)
    assert [near_miss.feed(part) for part in ["a <to", "p", " b"]] == ["a ", "<top", " b"]
    assert near_miss.finish() == (None, [])
    unfinished = CallWatcher(AUTO)
    assert unfinished.feed("x <tool_ca") == "x " and unfinished.finish() == ("<tool_ca", [])


@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": "required"},  # no tools
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "stocks"}}},
        {"tools": TOOLS * 2},  # names twice
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        {"tools": TOOLS, "response_format": {"type": "json_object"}},
    ],
)
def test_tool_requests_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "x"}], **fields}
        )


def test_tool_turns_in_the_conversation() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "time", "arguments": "{}"}}
    ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [call]})
    ChatMessage.model_validate({"role": "tool", "content": "noon", "tool_call_id": "call_1"})
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "tool", "content": "noon"})  # answers no call
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "user", "content": "x", "tool_calls": [call]})
    none = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "none"}
    request = ChatCompletionRequest.model_validate(
        {**none, "response_format": {"type": "json_object"}}
    )
    assert request.tool_choice_value == "none"

"""Tools in a chat: how they reach the model, how a call is required, how the reply comes back.

`plan_chat` turns `chat(messages, tools=..., tool_choice=...)` into a prompt and a constraint:

* Tools reach the model through its chat template when the template renders `tools=` (a probe
  tool is rendered to find out); earlier calls and results go to it as OpenAI-style fields
  (`tool_calls`, role "tool"). Otherwise `inline_tools` adds a system prompt listing the tools
  as JSON schemas and asking for Hermes-style calls, earlier calls are written back in that
  format and results become user turns in `<tool_response>` tags, so a template that knows
  only user/assistant/system still renders the conversation. A model with no chat template at
  all (a base model) gets that conversation as a plain transcript (`FALLBACK_TEMPLATE`).
* `tool_choice` "auto" (the default with tools): the model writes text or calls as it likes;
  once it opens a call (`<tool_call>`), the call is constrained to the tools' schemas up to
  its closing tag (a lazy grammar, `llama_sampling.constraint`).
* "required" (or a tool named, `{"type": "function", "function": {"name": ...}}`): the reply
  opens with `<tool_call>` and is a call to one of the tools (or the named one), constrained.
* "none": the tools are not shown.

The reply is split into text and calls as it streams (`split_tool_calls`, with
`llama_engine.tool_calls.ToolCallParser`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llama_engine.errors import InvalidParamsError, LlamaError
from llama_engine.messages import check_messages
from llama_engine.tool_calls import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ParsedPiece,
    ToolCallParser,
    loads_lenient,
)
from llama_engine.types import InvalidToolCall, StreamChunk, ToolCall

if TYPE_CHECKING:
    from llama_engine.engine import LlamaEngine

__all__ = [
    "ChatPlan",
    "ToolChoice",
    "check_tools",
    "inline_tools",
    "plan_chat",
    "render_tool_call",
    "split_tool_calls",
    "template_supports_tools",
    "tools_system_prompt",
]

_PROBE_TOOL = "llama_engine_probe_tool"
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")
"""How a chat with tools is written for a model with no chat template (a base model): a plain
transcript, "System: ...", "User: ...", "Assistant: ...", the tools in the system turn."""
MAX_TOOLS = 128


def check_tools(tools: object) -> list[dict[str, Any]]:
    """`tools` as OpenAI tool dicts ({"type": "function", "function": {"name", "description",
    "parameters"}}); a bare function dict is wrapped. A typed error says what is wrong."""
    if tools is None:
        return []
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidParamsError(
            "tools must be a list of {'type': 'function', 'function': {'name': ..., "
            f"'parameters': {{...}}}}}} dicts, got {type(tools).__name__}")
    if len(tools) > MAX_TOOLS:
        raise InvalidParamsError(f"{len(tools)} tools given; at most {MAX_TOOLS} are allowed")
    out: list[dict[str, Any]] = []
    for n, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InvalidParamsError(f"tool {n} must be a dict, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise InvalidParamsError(
                f"tool {n} has type {tool.get('type')!r}; only 'function' tools are supported")
        function = tool.get("function", tool)
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise InvalidParamsError(
                f"tool {n} needs a 'function' with a 'name' (a non-empty string of at most 128 "
                f"characters), got {str(tool)[:200]}")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidParamsError(
                f"tool {name!r} has 'parameters' of type {type(parameters).__name__}; give a "
                "JSON schema dict (or leave it out for a tool without arguments)")
        out.append({"type": "function", "function": dict(function)})
    return out


@dataclass(frozen=True)
class ToolChoice:
    """What a chat must do with its tools: mode "auto", "none" or "required" (and the one tool
    it must call, if named)."""

    mode: str
    name: str | None = None

    @classmethod
    def of(cls, tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> ToolChoice:
        """OpenAI's forms ("auto", "none", "required", {"type": "function", "function":
        {"name": ...}}), LangChain's ("any", True, a tool's name) and None ("auto" with tools)."""
        names = [t["function"]["name"] for t in tools]
        if tool_choice in (None, "auto", False):
            return cls("auto" if tools else "none")
        if tool_choice == "none":
            return cls("none")
        name = tool_choice
        if isinstance(tool_choice, Mapping):
            function = tool_choice.get("function", tool_choice)
            name = function.get("name") if isinstance(function, Mapping) else None
        if not tools:
            raise InvalidParamsError(
                f"tool_choice={tool_choice!r} requires a tool call but no tools were given; "
                "pass tools=[...]")
        if tool_choice in ("any", "required", True):
            return cls("required")
        if isinstance(name, str) and name in names:
            return cls("required", name)
        raise InvalidParamsError(
            f"tool_choice must be 'auto', 'none', 'required' (or 'any'), or name one of the "
            f"tools ({', '.join(names)}), got {str(tool_choice)[:200]}")


def template_supports_tools(engine: LlamaEngine, **template_kwargs: Any) -> bool:
    """Whether the model's chat template (or `chat_template=`) renders `tools=`: a probe tool's
    name shows up in the prompt."""
    tool = {"type": "function", "function": {
        "name": _PROBE_TOOL, "description": "probe",
        "parameters": {"type": "object", "properties": {}}}}
    try:
        text = engine.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool],
                                          **template_kwargs)
    except LlamaError:
        return False
    return _PROBE_TOOL in text


def tools_system_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system prompt that offers `tools` (OpenAI tool dicts) to a model whose template
    cannot: the tools as JSON schemas, and the Hermes `<tool_call>` format to answer in."""
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You are provided with function signatures within "
        "<tools></tools> XML tags. You may call one or more functions to assist with the user "
        "query. Don't make assumptions about what values to plug into functions.\n"
        f"<tools>\n{listed}\n</tools>\n"
        "For each function call, return a json object with function name and arguments within "
        f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "Function results come back inside <tool_response></tool_response> XML tags; use them "
        "to answer the user.")


def render_tool_call(name: str, arguments: Any) -> str:
    """An earlier call as the model would have written it (`arguments` a dict, or OpenAI's JSON
    string). Raises InvalidParamsError when the arguments are not JSON (a non-finite number, an
    object of no JSON type, nesting too deep)."""
    if isinstance(arguments, str):
        arguments = loads_lenient(arguments) if arguments.strip() else {}
    try:
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise InvalidParamsError(
            f"the arguments of the earlier call to {name!r} are not JSON ({e}); pass finite "
            "numbers, strings, booleans, None, lists and dicts only") from None
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def inline_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """Rewrite OpenAI-style messages (with `tool_calls` and role "tool") for a chat template that
    knows no tools: the tools become a system prompt, calls and results become plain text."""
    out: list[dict[str, Any]] = []
    for m in check_messages(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [render_tool_call(*_name_and_arguments(c)) for c in m["tool_calls"]]
            content = "\n".join([content, *calls] if content else calls)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):  # one user turn for consecutive results
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_results", None)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _parsed_arguments(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Earlier calls' arguments as objects, not OpenAI's JSON strings: templates write them
    with `tojson`, which would quote a string a second time."""
    out: list[Mapping[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                name, args = _name_and_arguments(c)
                if isinstance(args, str):
                    args = loads_lenient(args) if args.strip() else {}
                calls.append({**c, "function": {**c.get("function", {}), "name": name,
                                                "arguments": args}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _name_and_arguments(call: Any) -> tuple[str, Any]:
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidParamsError(
            "an assistant message's tool_calls must be {'id': ..., 'type': 'function', "
            f"'function': {{'name': ..., 'arguments': ...}}}} dicts, got {str(call)[:200]}")
    return function["name"], function.get("arguments", {})


@dataclass(frozen=True)
class ChatPlan:
    """A chat request, rendered: the prompt, the constraint on the reply (a response_format, or
    None) and whether the reply is parsed for tool calls (`prefix` is what the prompt already
    put in the model's mouth)."""

    prompt: str
    response_format: dict[str, Any] | None = None
    parse_calls: bool = False
    prefix: str = ""
    names: tuple[str, ...] = ()
    """The tools offered (a bare JSON reply is a call only if it names one)."""


def plan_chat(
    engine: LlamaEngine, messages: Sequence[Mapping[str, Any]], *, tools: Any = None,
    tool_choice: Any = None, chat_template: str | None = None,
) -> ChatPlan:
    """How to run `chat(messages, tools=, tool_choice=)` (see the module docstring)."""
    messages = check_messages(messages)
    checked = check_tools(tools)
    choice = ToolChoice.of(tool_choice, checked)
    shown = checked if choice.mode != "none" else []
    history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not chat_template and not engine.model.has_chat_template and (shown or history):
        chat_template = FALLBACK_TEMPLATE
    render: dict[str, Any] = {"chat_template": chat_template} if chat_template else {}
    if not (shown or history):
        return ChatPlan(engine.apply_chat_template(messages, **render))
    if template_supports_tools(engine, **render):
        prompt = engine.apply_chat_template(_parsed_arguments(messages), tools=shown or None,
                                            **render)
    else:
        prompt = engine.apply_chat_template(inline_tools(messages, shown), **render)
    if not shown:
        return ChatPlan(prompt)
    fmt = {"type": "tool_calls", "tools": shown, "name": choice.name}
    names = tuple(t["function"]["name"] for t in shown)
    if choice.mode == "required":
        prefix = TOOL_CALL_OPEN + "\n"
        return ChatPlan(prompt + prefix, {**fmt, "lazy": False}, True, prefix, names)
    return ChatPlan(prompt, {**fmt, "lazy": True}, True, names=names)


def split_tool_calls(chunks: Iterator[StreamChunk], prefix: str = "",
                     names: Collection[str] | None = None) -> Iterator[StreamChunk]:
    """The chunks of a reply with its tool calls taken out of the text: each call on the chunk
    that completes it (`tool_calls`), a call that does not parse left in the text and named in
    `invalid_tool_calls`; a reply with calls that ended normally ends "tool_calls"."""
    parser = ToolCallParser(prefix, names)
    for chunk in chunks:
        pieces = parser.feed(chunk.text) if chunk.text else []
        if chunk.finish_reason is not None:
            pieces += parser.finish(cut_off=chunk.finish_reason == "length")
            if chunk.finish_reason == "stop" and parser.calls:
                chunk.finish_reason = "tool_calls"
        _place(chunk, pieces)
        yield chunk


def _place(chunk: StreamChunk, pieces: list[ParsedPiece]) -> None:
    text: list[str] = []
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for piece in pieces:
        if isinstance(piece, str):
            text.append(piece)
        elif isinstance(piece, ToolCall):
            calls.append(piece)
        else:
            invalid.append(piece)
            text.append(piece.text)
    chunk.text = "".join(text)
    chunk.tool_calls = calls or None
    chunk.invalid_tool_calls = invalid or None

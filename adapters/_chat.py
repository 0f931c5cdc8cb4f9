"""One chat request through a `LlamaEngine`, with optional tools, as a stream of events.

Framework-neutral: messages are OpenAI-style dicts, tools OpenAI tool dicts. The adapters turn
the events into their own types (LangChain chunks, LlamaIndex responses).

* No tools: the messages are rendered with the model's chat template and streamed; every event
  is a text delta.
* Tools, model's choice (`tool_choice` None or "auto"): the tools are rendered by the template
  when it supports them, else inlined as a system prompt (see `adapters._tools`), and the reply
  is parsed into text and `ToolCall`s as it streams.
* Tools, call required (`tool_choice` "any"/"required"/True, a tool's name, or
  `{"type": "function", "function": {"name": ...}}`): the call is written key by key
  (`adapters._forced`), so it always has the tool's shape.
* `tool_choice="none"`: the tools are not shown to the model.

The last event is always a `Final` with usage and the finish reason ("tool_calls" when the reply
called a tool).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adapters._forced import ForcedCall, Step, arun_forced, forced_call, run_forced
from adapters._tools import (
    InvalidToolCall,
    ToolCall,
    ToolCallParser,
    inline_tools,
    template_supports_tools,
)
from llama_engine import (
    Completion,
    InvalidParamsError,
    LlamaEngine,
    SamplingParams,
    StreamChunk,
    Usage,
)

__all__ = ["ChatCall", "Event", "Final", "normalize_tool_choice"]


@dataclass(frozen=True, kw_only=True)
class Final:
    """The end of a reply: token counts and why it ended."""

    usage: Usage
    finish_reason: str


Event = str | ToolCall | InvalidToolCall | Final


def normalize_tool_choice(
    tool_choice: Any, tools: Sequence[Mapping[str, Any]]
) -> tuple[bool, str | None, bool]:
    """(call required, the tool it must be or None, show the tools at all)."""
    names = [t["function"]["name"] for t in tools]
    if tool_choice in (None, "auto", False):
        return False, None, True
    if tool_choice == "none":
        return False, None, False
    if tool_choice in ("any", "required", True):
        return True, None, True
    name = tool_choice
    if isinstance(tool_choice, Mapping):
        name = tool_choice.get("function", tool_choice).get("name")
    if isinstance(name, str) and name in names:
        return True, name, True
    raise InvalidParamsError(
        f"tool_choice must be 'auto', 'none', 'any', 'required' or the name of a bound tool "
        f"({', '.join(names) or 'none bound'}), got {tool_choice!r}")


class ChatCall:
    """A chat request, rendered and ready to run once with `events()` or `aevents()`.

    `chat_template` replaces the model's own template (e.g. with one that renders tools).
    """

    def __init__(
        self,
        engine: LlamaEngine,
        messages: Sequence[Mapping[str, Any]],
        *,
        params: SamplingParams,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        chat_template: str | None = None,
    ) -> None:
        tools = list(tools or ())
        render: dict[str, Any] = {"chat_template": chat_template} if chat_template else {}
        self.forced, self.forced_name, show = normalize_tool_choice(tool_choice, tools)
        self.tools = tools if show else []
        self.engine = engine
        self.params = params
        history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
        if not (self.tools or history):
            self.prompt = engine.apply_chat_template(messages, **render)
        elif template_supports_tools(engine, **render):
            self.prompt = engine.apply_chat_template(messages, tools=self.tools or None, **render)
        else:
            self.prompt = engine.apply_chat_template(inline_tools(messages, self.tools), **render)
        self.prompt_ids = engine.tokenize(self.prompt, add_special=False)

    def events(self) -> Iterator[Event]:
        if self.forced:
            done = run_forced(self.engine, self._forced_steps(), self.params)
            yield from self._forced_events(done)
            return
        parser = ToolCallParser() if self.tools else None
        stream = self.engine.stream(self.prompt_ids, params=self.params)
        try:
            last: StreamChunk | None = None
            for chunk in stream:
                last = chunk
                yield from _pieces(parser, chunk.text)
            yield from self._finish(parser, last)
        finally:
            stream.close()

    async def aevents(self) -> AsyncIterator[Event]:
        if self.forced:
            done = await arun_forced(self.engine, self._forced_steps(), self.params)
            for event in self._forced_events(done):
                yield event
            return
        parser = ToolCallParser() if self.tools else None
        stream = self.engine.astream(self.prompt_ids, params=self.params)
        try:
            last: StreamChunk | None = None
            async for chunk in stream:
                last = chunk
                for event in _pieces(parser, chunk.text):
                    yield event
            for event in self._finish(parser, last):
                yield event
        finally:
            stream.close()

    def _forced_steps(self) -> Generator[Step, Completion, ForcedCall]:
        return forced_call(self.prompt, self.tools, self.forced_name,
                           max_tokens=self.params.max_tokens, tokenize=self._tokenize)

    def _tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_special=False)

    def _forced_events(self, done: ForcedCall) -> Iterator[Event]:
        yield done.call
        usage = Usage(prompt_tokens=len(self.prompt_ids), cached_tokens=done.cached_tokens,
                      completion_tokens=done.completion_tokens)
        yield Final(usage=usage, finish_reason="tool_calls")

    def _finish(self, parser: ToolCallParser | None, last: StreamChunk | None) -> Iterator[Event]:
        if parser is not None:
            yield from parser.finish()
        usage = (last.usage if last is not None else None) or Usage(
            prompt_tokens=len(self.prompt_ids))
        reason = (last.finish_reason if last is not None else None) or "cancelled"
        if parser is not None and parser.calls:
            reason = "tool_calls"
        yield Final(usage=usage, finish_reason=reason)


def _pieces(parser: ToolCallParser | None, text: str) -> list[Event]:
    if not text:
        return []
    return [text] if parser is None else list(parser.feed(text))

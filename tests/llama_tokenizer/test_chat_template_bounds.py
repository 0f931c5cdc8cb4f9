"""Chat templates are untrusted programs: every render ends, soon, in a prompt or a typed error.

Covers the bounds of `llama_tokenizer._template_bounds` (one test per hostile construct, then a
hypothesis fuzz over hostile template sources and messages), OpenAI-style content parts, and
parity with transformers' renderer on real templates (copied from llama.cpp's models/templates,
plus the official Qwen2.5 and Gemma 3 templates), so the bounds change nothing for them.
"""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.utils.chat_template_utils import render_jinja_template

from llama_engine.errors import ConfigError, InvalidParamsError, LlamaError
from llama_tokenizer import _template_bounds as bounds
from llama_tokenizer.chat_template import ChatTemplate, compile_chat_template

TEMPLATES = {p.stem: p.read_text() for p in (Path(__file__).parent / "chat_templates").iterdir()}
TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "date_string": "26 Jul 2024"}
USER = [{"role": "user", "content": "hi"}]
SECONDS = 3.0  # what any single hostile render may take here, on a busy 2-core machine


@pytest.fixture
def short_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    """Renders get a 0.3 s time limit, so the cases that only the clock stops stay quick."""
    monkeypatch.setattr(bounds, "RENDER_SECONDS", 0.3)
    return 0.3


def _render(source: str, messages: list[dict[str, Any]] | None = None, **kw: Any) -> str:
    return ChatTemplate(source).render(USER if messages is None else messages, **kw)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- one test per hostile construct ---------------------------------------------------------------
RUNAWAY = [
    ("{{ (9**(9**9)) > 0 }}", "an integer of about"),
    ("{{ 2 ** 100000 }}", "an integer of about"),
    ("{{ (2 ** 3000) * (2 ** 3000) }}", "a product of about"),
    ("{{ ('9' * 4000) | int }}", "computed an integer of"),
    ("{{ 'x' * 10**10 }}", "repeated a value with '\\*'"),
    ("{{ 10**9 * 'ab' }}", "repeated a value with '\\*'"),
    ("{{ ([0] * 10**9) | length }}", "repeated a value with '\\*'"),
    ("{% for i in range(10**9) %}{% endfor %}", r"range\(\) of 1,000,000,000 items"),
    ("{{ range(10**100) | list }}", r"range\(\) of"),
    (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "loop iterations",
    ),
    ("{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}", "calls more than 64 deep"),
    ("{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}", "calls more than 64 deep"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "characters of output"),
    ("{% for i in range(100000) %}" + "z" * 1000 + "{% endfor %}", "characters of output"),
    (
        "{% macro m() %}{% for i in range(50000) %}{{ 'w' * 999 }}{% endfor %}{% endmacro %}"
        "{% set s = m() %}",
        "characters of output",
    ),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s | length }}",
        "joined strings with '~'",
    ),
    (
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "joined values with '\\+'",
    ),
    (
        "{% set ns = namespace(l=[0]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}"
        "{% endfor %}{{ ns.l }}",
        "built a value of more than",
    ),
    (
        "{% set ns = namespace(l=0) %}{% for i in range(100) %}{% set ns.l = [ns.l] %}{% endfor %}",
        "more than 64 levels deep",
    ),
    (
        "".join(f"{{% set v{i} = 'x' * 1000000 ~ {i} %}}" for i in range(100)),
        "of values in total",
    ),
    ("{% set ns = namespace() %}{% set ns.me = [ns] %}", r"namespace\(\) inside"),
    ("{{ 'x' | center(10**9) }}", "padded a string with center"),
    ("{{ 'x'.ljust(10**9) }}", r"padded a string with ljust\(\)"),
    ("{{ ('x' | safe).center(10**10) }}", r"padded a string with center\(\)"),
    ("{{ (1).to_bytes(10**10, 'big') }}", "converted an integer to bytes"),
    ("{{ ('\t' * 100000).expandtabs(10**6) }}", "expanded tabs"),
    ("{{ '{:>999999999}'.format(1) }}", r"with format\(\)"),
    ("{{ '{:{w}}'.format(1, w=10**9) }}", r"with format\(\)"),
    ("{{ '%999999999d' % 1 }}", "with '%'"),
    ("{{ '%*d' % (10**9, 1) }}", "with '%'"),
    ("{{ '%999999999s' | format('x') }}", "formatted a string"),
    ("{{ ('a' * 100000).replace('', 'b' * 100) }}", "replaced text"),
    ("{{ ('a' * 100000) | replace('a', 'b' * 1000) }}", "replaced text"),
    ("{{ ('-' * 100000).join(range(100000) | map('string')) }}", "joined strings"),
    ("{{ range(100000) | map('string') | join('-' * 100) }}", "joined strings"),
    ("{{ ('\n' * 1000000) | indent(1000) }}", "indented text"),
    ("{{ ('a ' * 100000) | wordwrap(1, wrapstring='-' * 1000) }}", "wrapped text"),
    ("{{ ([[1]] * 100000) | sum(start=[]) }}", "summed sequences"),
    ("{{ range(1) | slice(10**9) | list }}", "slice filter"),
    ("{{ range(10) | batch(10**9, 'x') | list }}", "batch filter"),
    ("{{ messages | tojson(indent=10**8) }}", "tojson"),
    ("{{ strftime_now('%Y' * 100000) }}", "strftime_now a format"),
]


def _ids(cases: list[tuple[str, str]]) -> list[str]:
    return [f"{i}-{source[:30]}" for i, (source, _) in enumerate(cases)]


@pytest.mark.parametrize(("source", "phrase"), RUNAWAY, ids=_ids(RUNAWAY))
def test_runaway_template_stops_with_a_typed_error(source: str, phrase: str) -> None:
    rss = _maxrss_mb()
    start = time.monotonic()
    with pytest.raises(InvalidParamsError, match=phrase) as info:
        _render(source)
    assert time.monotonic() - start < SECONDS
    assert _maxrss_mb() - rss < 512
    message = str(info.value)
    assert "chat_template=" in message and len(message) < 1000


def test_clock_stops_what_no_count_does(short_deadline: float) -> None:
    fanout = (  # 2**60 calls, each one cheap and none of them too deep
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    )
    compare = (  # 100,000 comparisons of two 1 MB strings, no output
        "{% set a = 'a' * 1000000 %}{% set b = 'a' * 1000000 %}"
        "{% for i in range(100000) %}{% if a == b %}{% endif %}{% endfor %}"
    )
    for source in (fanout, compare):
        start = time.monotonic()
        with pytest.raises(InvalidParamsError, match=r"longer than its 0\.3 s time limit"):
            _render(source)
        assert time.monotonic() - start < short_deadline + 1.0


def test_the_default_time_limit() -> None:
    assert bounds.RENDER_SECONDS == 2.0
    budget = bounds._Budget(bounds.InputStats(items=100_000))
    assert budget.seconds == pytest.approx(3.0)  # long conversations get more time


@pytest.mark.parametrize(
    ("source", "phrase"),
    [
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "does not compile: RecursionError"),
        (
            "".join(f"{{% for x{i} in [1] %}}" for i in range(30)) + "{% endfor %}" * 30,
            "does not compile: SyntaxError",
        ),
        ("{% for %}{{", "does not compile: Expected an expression"),
        ("{{ 1 }}" * 40000, "characters long, over the limit"),
        ("{{ 1 }}" * 6000, "more than 16,384 Jinja tokens"),
        ("   ", "non-empty Jinja string"),
    ],
)
def test_template_that_cannot_compile_is_a_config_error(source: str, phrase: str) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError, match=phrase):
        ChatTemplate(source)
    assert time.monotonic() - start < SECONDS


@pytest.mark.parametrize(
    ("source", "phrase"),
    [
        ("{{ foo.bar }}", "rendering the chat template failed: 'foo' is undefined"),
        ("{{ 1 + 'a' }}", "failed: TypeError: unsupported operand"),
        ("{{ 1 // 0 }}", "failed: ZeroDivisionError"),
        ("{{ 2 ** 1100 / 3 }}", "failed: OverflowError"),
        ("{{ ''.__class__.__mro__ }}", "failed: access to attribute '__class__'"),
        ("{{ lipsum(10**9) }}", "failed: 'lipsum' is undefined"),
        ("{% include 'other' %}", "failed: TypeError: no loader"),
        ("{{ '{'.format(1) }}", "failed: ValueError: Single '{'"),
        ("{{ raise_exception('x' * 10**6) }}", r"rejected the conversation: x+\.\.\. \(1,000,000"),
    ],
)
def test_every_other_template_failure_is_typed(source: str, phrase: str) -> None:
    with pytest.raises(InvalidParamsError, match=phrase) as info:
        _render(source)
    assert len(str(info.value)) < 1000


def test_oversized_input_is_refused_before_rendering() -> None:
    nested: Any = "x"
    for _ in range(100):
        nested = {"a": nested}
    with pytest.raises(InvalidParamsError, match="more than 64 levels deep; flatten"):
        _render("{{ 1 }}", [{"role": "user", "content": "hi", "meta": nested}])
    with pytest.raises(InvalidParamsError, match="hold more than 1,000,000 values"):
        _render("{{ 1 }}", [{"role": "user", "content": "hi", "meta": [0] * 1_000_001}])


def test_a_runaway_template_does_not_hold_up_another_thread(short_deadline: float) -> None:
    hostile = (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
    )
    errors: list[BaseException] = []

    def run_hostile() -> None:
        try:
            _render(hostile)
        except BaseException as e:
            errors.append(e)

    source, messages = TEMPLATES["qwen2.5-instruct"], _CHAT[0]
    expected = _reference(source, messages, None, True)
    thread = threading.Thread(target=run_hostile)
    thread.start()
    start = time.monotonic()
    for _ in range(20):
        assert compile_chat_template(source).render(messages, **TOKENS) == expected
    thread.join()
    assert time.monotonic() - start < 5 * short_deadline + SECONDS
    assert len(errors) == 1 and isinstance(errors[0], InvalidParamsError)
    assert "time limit" in str(errors[0])


# -- real templates render exactly as transformers renders them -----------------------------------
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "Which city"},
                    "days": {"type": "array", "items": {"type": "integer"}, "description": "n"},
                    "unit": {"type": ["string", "integer"], "description": "C or F"},
                },
                "required": ["city"],
            },
        },
    }
]
_CALL = {"id": "call12345", "type": "function"}
_CHAT = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France? 日本"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "  And of Japan?  "},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {**_CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "call12345", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": "Clear skies."},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {**_CALL, "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call12345", "content": "rain"},
    ],
]


def _reference(source: str, messages: list[dict[str, Any]], tools: Any, gen: bool) -> str | None:
    """What transformers renders, or None when the template refuses the conversation there."""
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=source,
            add_generation_prompt=gen,
            **TOKENS,
        )
    except Exception:
        return None
    return rendered[0]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_real_templates_render_as_transformers_does(name: str) -> None:
    template = compile_chat_template(TEMPLATES[name])
    rendered = 0
    for messages in _CHAT:
        for tools in (None, _TOOLS):
            for gen in (True, False):
                expected = _reference(TEMPLATES[name], messages, tools, gen)
                if expected is None:  # the template itself refuses: we must refuse too, typed
                    with pytest.raises(InvalidParamsError):
                        template.render(messages, tools=tools, add_generation_prompt=gen, **TOKENS)
                    continue
                got = template.render(messages, tools=tools, add_generation_prompt=gen, **TOKENS)
                assert got == expected
                rendered += 1
    assert rendered >= 4


def test_a_real_template_that_recurses_forever_is_stopped() -> None:
    # Command R+ turns {"type": ["string", "null"]} into Union[...] by recursing on each type
    # name; "null" is not one it knows and, being a string, is iterable: it never stops.
    tools = [
        {
            "type": "function",
            "function": {
                **_TOOLS[0]["function"],
                "parameters": {
                    "type": "object",
                    "properties": {"unit": {"type": ["string", "null"]}},
                    "required": [],
                },
            },
        }
    ]
    source = TEMPLATES["command-r-plus-tool-use"]
    with pytest.raises(RecursionError):
        render_jinja_template(conversations=[USER], tools=tools, chat_template=source)
    start = time.monotonic()
    with pytest.raises(InvalidParamsError, match="calls more than 64 deep"):
        compile_chat_template(source).render(USER, tools=tools)
    assert time.monotonic() - start < SECONDS


@pytest.mark.parametrize("name", ["qwen2.5-instruct", "llama-3.2-instruct", "gemma-3-it"])
def test_long_conversations_stay_within_the_bounds(name: str) -> None:
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "ab " * 100}
        for i in range(4000)
    ]
    big = [{"role": "user", "content": "é" * 3_000_000}]  # one message over MAX_VALUE_SIZE
    for messages in (turns, big):
        start = time.monotonic()
        got = compile_chat_template(TEMPLATES[name]).render(messages, **TOKENS)
        assert time.monotonic() - start < SECONDS
        assert got == _reference(TEMPLATES[name], messages, None, True)


# -- OpenAI-style content parts -------------------------------------------------------------------
def test_text_parts_are_joined_like_llama_cpp_and_vllm() -> None:
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]
    messages = [{"role": "user", "content": parts}]
    assert _render("{{ messages[0].content }}", messages) == "hi\n there"
    assert _render("{{ messages[0].content }}", [{"role": "user", "content": []}]) == ""
    assert messages[0]["content"] is parts  # the caller's messages are left as they were
    qwen = compile_chat_template(TEMPLATES["qwen2.5-instruct"])
    joined = [{"role": "user", "content": "hi\n there"}]
    assert qwen.render(messages) == qwen.render(joined)
    gemma = compile_chat_template(TEMPLATES["gemma-3-it"])
    assert gemma.render(messages, **TOKENS) == _reference(
        TEMPLATES["gemma-3-it"], joined, None, True
    )


@pytest.mark.parametrize(
    ("part", "phrase"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "type 'image_url'"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "'input_audio'"),
        ({"text": "no type"}, "has type None; only 'text' parts are supported"),
        ("plain string", "part 1 must be a dict like"),
        ({"type": "text"}, "whose 'text' is NoneType, not a string"),
        ({"type": "text", "text": 5}, "whose 'text' is int"),
    ],
)
def test_other_content_parts_are_refused(part: Any, phrase: str) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(InvalidParamsError, match=phrase) as info:
        _render("{{ messages }}", messages)
    assert "message 0 content part 1" in str(info.value)


def test_assistant_content_none_with_tool_calls_still_renders() -> None:
    out = compile_chat_template(TEMPLATES["qwen2.5-instruct"]).render(_CHAT[1], tools=_TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in out


# -- fuzz: any template, any messages: a prompt or a typed error, quickly ------------------------
_HOSTILE = [
    "{{ 9 ** (9 ** 9) }}",
    "{{ 'x' * 10**10 }}",
    "{{ [0] * 10**9 }}",
    "{% for i in range(10**9) %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}",
    "{% set ns = namespace(l=[0]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}"
    "{% endfor %}{{ ns.l }}",
    "{{ 'x' | center(10**9) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '%999999999d' % 1 }}",
    "{{ ('a' * 100000).replace('', 'bb') }}",
    "{{ messages | tojson(indent=10**8) }}",
    "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
    "{{ raise_exception('no') }}",
    "{{ nothing.here }}",
    "{{ 1 // 0 }}",
    "{{ ''.__class__.__mro__ }}",
    "{% include 'x' %}",
    "{{ messages[0].content * 100000 }}",
    "{{ messages | map(attribute='content') | join('-' * 100000) }}",
]
_BENIGN = [
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}",
    "{{ bos_token }}{{ messages | length }}",
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{{ tools | tojson }}",
    "{{ (messages[0].content | string | trim)[:10] }}",
    "{% set n = namespace(k=0) %}{% for m in messages %}{% set n.k = n.k + 1 %}{% endfor %}"
    "{{ n.k }}",
]
_WRAPPERS = [
    "{% for i in range(1000) %}@{% endfor %}",
    "{% for i in range(100000) %}@{% endfor %}",
    "{% for m in messages %}{% for n in messages %}@{% endfor %}{% endfor %}",
    "{% macro w() %}@{% endmacro %}{{ w() }}{{ w() ~ w() }}",
    "{% set v %}@{% endset %}{{ v ~ v }}",
    "{% filter upper %}@{% endfilter %}",
    "{% if messages %}@{% else %}@{% endif %}",
    "{{ [@] }}",
]
_GARBAGE = st.text(alphabet="{}%#()[]|~*+-'\"abcdefimnorstx0129 .,:=!<>\n", max_size=30)
_PIECE = st.one_of(st.sampled_from(_HOSTILE), st.sampled_from(_BENIGN), _GARBAGE)
_SOURCE = st.recursive(
    _PIECE,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(_WRAPPERS), inner).map(lambda w: w[0].replace("@", w[1])),
        st.lists(inner, min_size=2, max_size=3).map("".join),
    ),
    max_leaves=6,
)
_PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=20)),
    st.just({"type": "image_url", "image_url": {"url": "x"}}),
    st.just({"type": "text"}),
    st.just("raw"),
)
_CONTENT = st.one_of(
    st.text(max_size=40),
    st.none(),
    st.integers(),
    st.lists(_PART, max_size=3),
    st.just("x" * 200_000),
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": _CONTENT},
    optional={"tool_calls": st.just([{**_CALL, "function": {"name": "f", "arguments": "{}"}}])},
)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(source=_SOURCE, messages=st.lists(_MESSAGE, min_size=1, max_size=4))
def test_fuzz_any_template_ends_in_a_prompt_or_a_typed_error(
    short_deadline: float, source: str, messages: list[dict[str, Any]]
) -> None:
    rss = _maxrss_mb()
    start = time.monotonic()
    try:
        out = ChatTemplate(source).render(messages, tools=_TOOLS, **TOKENS)
        assert isinstance(out, str)
        assert len(out) <= bounds.MAX_OUTPUT_CHARS + 4 * 1_000_000
    except LlamaError as e:
        assert str(e)
    assert time.monotonic() - start < short_deadline + SECONDS
    assert _maxrss_mb() - rss < 512

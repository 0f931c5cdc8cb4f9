"""`StopChecker` over streamed text, and `is_stop_token`."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_engine import InvalidParamsError, SamplingParams
from llama_sampling import StopChecker, is_stop_token


def run(stops: list[str], deltas: list[str]) -> tuple[list[tuple[str, bool]], str]:
    checker = StopChecker(stops)
    pushed = [checker.push(d) for d in deltas]
    return pushed, checker.flush()


def test_stop_string_split_one_char_per_token() -> None:
    pushed, rest = run(["###"], ["#", "#", "#"])
    assert pushed == [("", False), ("", False), ("", True)]
    assert rest == ""


def test_stop_after_text_returns_only_the_text_before() -> None:
    pushed, rest = run(["###"], ["Hello", " world#", "##", " never"])
    assert pushed == [("Hello", False), (" world", False), ("", True), ("", True)]
    assert rest == ""


def test_stop_inside_one_delta() -> None:
    assert StopChecker(["STOP"]).push("foo STOP bar") == ("foo ", True)


def test_diverging_prefix_is_emitted_in_full() -> None:
    pushed, rest = run(["###"], ["a#", "#b", "c"])
    assert pushed == [("a", False), ("##b", False), ("c", False)]
    assert rest == ""


def test_held_back_text_comes_out_on_flush() -> None:
    checker = StopChecker(["</s>"])
    assert checker.push("bye </") == ("bye ", False)
    assert checker.flush() == "</"
    assert checker.flush() == ""


def test_multiple_stop_strings() -> None:
    pushed, _ = run(["\nUser:", "</s>"], ["Sure.", "\n", "Use", "r:", " hi"])
    assert pushed == [("Sure.", False), ("", False), ("", False), ("", True), ("", True)]
    pushed, _ = run(["\nUser:", "</s>"], ["Sure.", "\n", "Use", "ful</", "s>"])
    assert "".join(t for t, _ in pushed) == "Sure.\nUseful"
    assert pushed[-1] == ("", True)


def test_the_first_stop_string_to_complete_wins() -> None:
    # "bc" completes before "abcd" does, whatever the split
    assert StopChecker(["abcd", "bc"]).push("abcd") == ("a", True)
    pushed, _ = run(["abcd", "bc"], ["ab", "c", "d"])
    assert pushed == [("", False), ("a", True), ("", True)]
    # same end: the longer (earlier-starting) one wins
    assert StopChecker(["bc", "abc"]).push("xabc") == ("x", True)


def test_no_stop_strings_passes_text_through() -> None:
    checker = StopChecker([])
    assert checker.push("any ###") == ("any ###", False)
    assert checker.flush() == ""


def test_a_single_string_is_one_stop_string() -> None:
    assert StopChecker("ab").push("xaby") == ("x", True)  # type: ignore[arg-type]


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(InvalidParamsError, match="non-empty"):
        StopChecker(["ok", ""])


def test_stopped_property() -> None:
    checker = StopChecker(["x"])
    assert not checker.stopped
    checker.push("ax")
    assert checker.stopped


def _reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the stop string that completes first in `text` (earliest end, then start)."""
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    if not hits:
        return text, False
    return text[: min(hits)[1]], True


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(alphabet="ab#", max_size=30),
    stops=st.lists(st.text(alphabet="ab#", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_any_split_gives_the_same_result(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[i:j] for i, j in pairwise(bounds)]
    checker = StopChecker(stops)
    emitted, stopped = [], False
    for d in deltas:
        out, stopped = checker.push(d)
        emitted.append(out)
        if stopped:
            break
    emitted.append(checker.flush())
    expected, expect_stop = _reference(text, stops)
    assert "".join(emitted) == expected
    assert stopped == expect_stop
    for i in range(1, len(emitted)):  # no prefix of the output ever held a stop string
        assert not any(s in "".join(emitted[:i]) for s in stops)


def test_is_stop_token() -> None:
    eog = {2, 32000}
    params = SamplingParams(stop_token_ids=(13,))
    assert is_stop_token(13, params, eog)
    assert is_stop_token(2, params, eog)
    assert not is_stop_token(5, params, eog)
    ignoring = SamplingParams(stop_token_ids=(13,), ignore_eos=True)
    assert not is_stop_token(2, ignoring, eog)
    assert is_stop_token(13, ignoring, eog)

import pytest

from llama_engine import InvalidParamsError, LlamaError, SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "phrase"),
    [
        ("temperature", -0.1, "temperature must be >= 0"),
        ("top_p", 0.0, "top_p must be in (0, 1]"),
        ("top_p", 1.5, "top_p must be in (0, 1]"),
        ("min_p", 1.0, "min_p must be in [0, 1)"),
        ("typical_p", 0.0, "typical_p must be in (0, 1]"),
        ("top_k", -1, "top_k must be >= 0"),
        ("max_tokens", 0, "max_tokens must be >= 1"),
        ("repetition_penalty", 0.0, "repetition_penalty must be in [0.01, 100]"),
        ("repetition_penalty", 1e-300, "repetition_penalty must be in [0.01, 100]"),
        ("frequency_penalty", 3.0, "frequency_penalty must be in [-2, 2]"),
        ("presence_penalty", -2.5, "presence_penalty must be in [-2, 2]"),
        ("seed", -1, "seed must be >= 0"),
        ("logprobs", 21, "logprobs must be in [0, 20]"),
        ("temperature", float("nan"), "temperature must be a finite number >= 0"),
        ("temperature", float("inf"), "temperature must be a finite number >= 0"),
        ("top_p", float("nan"), "top_p must be a finite number in (0, 1]"),
        ("logit_bias", {3: float("inf")}, "logit_bias[3] must be a finite number"),
        ("max_tokens", 1.5, "max_tokens must be an integer"),
        ("temperature", "hot", "temperature must be a number"),
    ],
)
def test_invalid_values_name_the_field_and_range(field: str, value: object, phrase: str) -> None:
    with pytest.raises(InvalidParamsError) as e:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert phrase in str(e.value)
    assert isinstance(e.value, LlamaError) and isinstance(e.value, ValueError)


def test_unknown_field_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(InvalidParamsError, match=r"unknown sampling parameter.*temprature"):
        SamplingParams.from_kwargs(temprature=0.5)


def test_logit_bias_and_stop_are_checked() -> None:
    with pytest.raises(InvalidParamsError, match="logit_bias keys"):
        SamplingParams(logit_bias={-3: 1.0})
    with pytest.raises(InvalidParamsError, match=r"logit_bias\[5\] must be in \[-100, 100\]"):
        SamplingParams(logit_bias={5: 500.0})
    with pytest.raises(InvalidParamsError, match="stop must hold non-empty strings"):
        SamplingParams(stop=("",))


def test_stop_accepts_a_single_string_and_replace_validates() -> None:
    p = SamplingParams(stop="###")
    assert p.stop == ("###",)
    assert p.replace(temperature=0).greedy
    with pytest.raises(InvalidParamsError):
        p.replace(top_p=2.0)

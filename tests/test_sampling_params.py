"""SamplingParams refuses out-of-range values when built, naming the field and the value."""

import math

import pytest

from dlengine import InvalidRequestError, SamplingParams

BAD = [
    (dict(max_tokens=-1), "max_tokens.*-1"),
    (dict(max_tokens=0), "max_tokens.*0"),
    (dict(max_tokens=2.5), "max_tokens.*2.5"),
    (dict(max_tokens=True), "max_tokens.*True"),
    (dict(temperature=-1), "temperature.*-1"),
    (dict(temperature=math.nan), "temperature.*nan"),
    (dict(temperature=math.inf), "temperature.*inf"),
    (dict(temperature="0.5"), "temperature.*0.5"),
    (dict(top_p=2), "top_p.*2"),
    (dict(top_p=0.0), "top_p.*0.0"),
    (dict(top_p=math.nan), "top_p.*nan"),
    (dict(top_k=-2), "top_k.*-2"),
    (dict(min_p=1.5), "min_p.*1.5"),
    (dict(min_p=-math.inf), "min_p.*inf"),
    (dict(repetition_penalty=0.0), "repetition_penalty.*0.0"),
    (dict(repetition_penalty=math.nan), "repetition_penalty.*nan"),
    (dict(presence_penalty=3.0), "presence_penalty.*3.0"),
    (dict(frequency_penalty=-2.5), "frequency_penalty.*-2.5"),
    (dict(seed=1.5), "seed.*1.5"),
    (dict(min_tokens=-1), "min_tokens.*-1"),
    (dict(max_tokens=4, min_tokens=5), "min_tokens.*5"),
    (dict(logprobs=-1), "logprobs.*-1"),
    (dict(stop=[""]), "stop strings"),
    (dict(stop=[3]), "stop strings.*3"),
    (dict(stop=5), "stop.*5"),
    (dict(stop_token_ids=[-4]), "stop_token_ids.*-4"),
    (dict(ignore_eos="yes"), "ignore_eos.*yes"),
]


@pytest.mark.parametrize("kwargs, match", BAD, ids=[str(k) for k, _ in BAD])
def test_out_of_range_fields_are_refused_at_construction(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_edge_values_are_accepted():
    SamplingParams(max_tokens=1, temperature=0, top_k=-1, top_p=1, min_p=1.0, repetition_penalty=1e-3,
                   presence_penalty=-2, frequency_penalty=2, seed=0, min_tokens=1, logprobs=0,
                   stop="x", stop_token_ids=(0, 5))
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(temperature=0.0).greedy


def test_validate_rechecks_ranges_and_checks_the_vocabulary():
    params = SamplingParams(stop_token_ids=[7], logprobs=3)
    params.validate(vocab_size=100)
    params.temperature = math.nan  # a dataclass can be changed after construction
    with pytest.raises(InvalidRequestError, match="temperature.*nan"):
        params.validate(vocab_size=100)
    with pytest.raises(InvalidRequestError, match="stop token id 7"):
        SamplingParams(stop_token_ids=[7]).validate(vocab_size=5)
    with pytest.raises(InvalidRequestError, match="logprobs=3"):
        SamplingParams(logprobs=3).validate(vocab_size=2)

"""Seeded workloads: deterministic for a seed, lengths in range, the shared prefix in every
prompt, Poisson arrivals, special tokens never drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxkv.bench.workload import (
    Workload,
    WorkloadSpec,
    make_workload,
    prefix_probe,
    sampleable_token_ids,
)

VOCAB = 1000
SPECIAL = (0, 1, 2, 999)
TOKEN_IDS = sampleable_token_ids(VOCAB, SPECIAL)


def test_sampleable_token_ids_drop_the_special_ones():
    assert TOKEN_IDS.size == VOCAB - len(SPECIAL)
    assert not set(SPECIAL) & set(TOKEN_IDS.tolist())
    with pytest.raises(ValueError, match="every id"):
        sampleable_token_ids(2, (0, 1))


def test_same_seed_same_workload_and_another_seed_another():
    spec = WorkloadSpec(num_requests=20, prompt_len=(4, 50), output_len=(1, 9), seed=3)
    first, again = make_workload(spec, TOKEN_IDS), make_workload(spec, TOKEN_IDS)
    assert first == again
    other = make_workload(WorkloadSpec(20, (4, 50), (1, 9), seed=4), TOKEN_IDS)
    assert [r.prompt_token_ids for r in other.requests] != [
        r.prompt_token_ids for r in first.requests
    ]


def test_lengths_lie_in_range_and_cover_it():
    spec = WorkloadSpec(num_requests=400, prompt_len=(5, 12), output_len=(2, 6), seed=1)
    workload = make_workload(spec, TOKEN_IDS)
    prompt_lens = {r.prompt_len for r in workload.requests}
    output_lens = {r.output_len for r in workload.requests}
    assert prompt_lens == set(range(5, 13))  # uniform and inclusive: every length appears
    assert output_lens == set(range(2, 7))
    assert len(workload) == 400
    assert [r.index for r in workload.requests] == list(range(400))
    assert workload.num_output_tokens == sum(r.output_len for r in workload.requests)
    for request in workload.requests:
        assert set(request.prompt_token_ids) <= set(TOKEN_IDS.tolist())


def test_shared_prefix_starts_every_prompt():
    spec = WorkloadSpec(num_requests=10, prompt_len=(0, 8), output_len=(1, 1), shared_prefix=16)
    workload = make_workload(spec, TOKEN_IDS)
    prefix = workload.requests[0].prompt_token_ids[:16]
    for request in workload.requests:
        assert request.prompt_token_ids[:16] == prefix
        assert 16 <= request.prompt_len <= 24
    assert spec.max_sequence_len == 16 + 8 + 1


def test_infinite_rate_means_all_at_once():
    workload = make_workload(WorkloadSpec(num_requests=5, prompt_len=(1, 2)), TOKEN_IDS)
    assert [r.arrival for r in workload.requests] == [0.0] * 5


def test_poisson_arrivals_increase_with_the_requested_mean_gap():
    rate = 10.0
    spec = WorkloadSpec(num_requests=2000, prompt_len=(1, 1), request_rate=rate, seed=7)
    arrivals = np.array([r.arrival for r in make_workload(spec, TOKEN_IDS).requests])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.1)
    # Exponential gaps: the standard deviation equals the mean.
    assert gaps.std() == pytest.approx(1 / rate, rel=0.15)


def test_changing_the_rate_keeps_the_prompts():
    base = dict(num_requests=8, prompt_len=(3, 30), output_len=(1, 5), seed=2)
    at_once = make_workload(WorkloadSpec(**base), TOKEN_IDS)
    spread = make_workload(WorkloadSpec(**base, request_rate=2.0), TOKEN_IDS)
    assert [(r.prompt_token_ids, r.output_len) for r in at_once.requests] == [
        (r.prompt_token_ids, r.output_len) for r in spread.requests
    ]


def test_round_trip_through_a_dict():
    spec = WorkloadSpec(num_requests=4, prompt_len=(2, 9), request_rate=3.5, shared_prefix=2)
    workload = make_workload(spec, TOKEN_IDS)
    assert Workload.from_dict(workload.to_dict()) == workload
    infinite = make_workload(WorkloadSpec(num_requests=2, prompt_len=(1, 2)), TOKEN_IDS)
    data = infinite.to_dict()
    assert data["spec"]["request_rate"] is None  # JSON has no inf
    assert math.isinf(Workload.from_dict(data).spec.request_rate)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("num_requests", 0, "num_requests"),
        ("prompt_len", (5, 4), "prompt_len"),
        ("output_len", (0, 4), "output_len"),
        ("prompt_len", (1,), "prompt_len"),
        ("request_rate", 0.0, "request_rate"),
        ("request_rate", math.nan, "request_rate"),
        ("shared_prefix", -1, "shared_prefix"),
    ],
)
def test_bad_specs_name_the_field(field, value, match):
    with pytest.raises((ValueError, TypeError), match=match):
        WorkloadSpec(**{field: value})


def test_from_prompts_checks_its_input():
    workload = Workload.from_prompts([[5, 6], [7]], [3, 1], arrivals=[0.0, 0.5])
    assert [r.prompt_len for r in workload.requests] == [2, 1]
    with pytest.raises(ValueError, match="increasing"):
        Workload.from_prompts([[5], [6]], [1, 1], arrivals=[1.0, 0.0])
    with pytest.raises(ValueError, match="output lengths"):
        Workload.from_prompts([[5]], [1, 2])


def test_prefix_probe_shares_the_prefix_only():
    cold, warm = prefix_probe(TOKEN_IDS, prefix_len=32, suffix_len=8, output_len=2, seed=0)
    a, b = cold.requests[0].prompt_token_ids, warm.requests[0].prompt_token_ids
    assert len(a) == len(b) == 40 and a[:32] == b[:32] and a[32:] != b[32:]
    again, _ = prefix_probe(TOKEN_IDS, prefix_len=32, suffix_len=8, output_len=2, seed=1)
    assert again.requests[0].prompt_token_ids[:32] != a[:32]  # a new seed: a cold prefix

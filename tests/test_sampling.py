"""The shared sampler: greedy, truncation rules, seeds, and its distribution."""

import numpy as np
import pytest

from assistant.inference.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1


def test_repeat_penalty_changes_the_greedy_choice():
    logits = np.array([0.0, 3.0, 2.9], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert s.sample(logits, history=[1]) == 2
    assert s.sample(logits, history=[0]) == 1


def test_top_k_one_is_greedy_even_when_hot():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    s = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    assert {s.sample(logits) for _ in range(50)} == {int(np.argmax(logits))}


def test_top_p_and_min_p_cut_the_tail():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    cand, probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0)).distribution(logits)
    assert list(cand) == [0, 1]
    assert probs == pytest.approx([0.625, 0.375])
    cand, _ = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.25)).distribution(logits)
    assert list(cand) == [0, 1, 2]  # 0.05 < 0.25 * 0.5


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).normal(size=500).astype(np.float32)
    draws = [[Sampler(SamplingParams(temperature=1.0, seed=42)).sample(logits) for _ in range(1)] for _ in range(3)]
    s1 = Sampler(SamplingParams(temperature=1.0, top_k=0, min_p=0, top_p=1, seed=7))
    s2 = Sampler(SamplingParams(temperature=1.0, top_k=0, min_p=0, top_p=1, seed=7))
    assert [s1.sample(logits) for _ in range(30)] == [s2.sample(logits) for _ in range(30)]
    assert draws[0] == draws[1] == draws[2]


def test_sample_frequencies_follow_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0))
    counts = np.bincount([s.sample(np.log(probs)) for _ in range(20000)], minlength=3) / 20000
    assert counts == pytest.approx(probs, abs=0.015)


def test_banned_tokens_are_never_sampled_and_the_row_is_left_alone():
    logits = np.array([5.0, 4.0, 3.0, -1.0], dtype=np.float32)
    greedy = Sampler(SamplingParams(temperature=0), banned=[0])
    assert greedy.sample(logits) == 1 and logits[0] == 5.0  # masked in a copy
    assert not greedy.is_argmax and Sampler(SamplingParams(temperature=0)).is_argmax
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5), banned=[0, 1]).sample(logits, history=[2]) == 2
    hot = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), banned=[0, 2])
    cand, probs = hot.distribution(logits)
    assert {int(c) for c, p in zip(cand, probs) if p > 0} == {1, 3} and probs.sum() == pytest.approx(1.0)
    assert {hot.sample(logits) for _ in range(200)} <= {1, 3}

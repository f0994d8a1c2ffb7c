import json
import math

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.errors import UserError
from pipeline.report.aggregate import Bootstrap, normalise, read_normalizer, seed_summary, stratified_iqm

BOOT = Bootstrap(resamples=2000, seed=3)


def test_iqm_of_made_up_scores_is_the_mean_of_the_middle_half_and_its_interval_contains_it():
    scores = [0.80, 0.10, 0.30, 0.70, 0.40, 0.60, 0.20, 0.50]  # middle half: 0.3, 0.4, 0.5, 0.6
    s = seed_summary(scores, BOOT)
    assert s["iqm"] == pytest.approx(0.45)
    assert s["iqm_low"] < 0.45 < s["iqm_high"]
    assert s["mean"] == pytest.approx(0.45) and s["std"] == pytest.approx(np.std(scores, ddof=1)) and s["n"] == 8
    assert seed_summary(scores, BOOT) == s  # seeded: the same interval every time


def test_the_interval_is_the_percentile_bootstrap_of_the_iqm():
    rng = np.random.default_rng(0)
    scores = rng.normal(0.6, 0.05, size=7)
    s = seed_summary(scores, Bootstrap(resamples=4000, seed=1))
    reference = []
    for _ in range(4000):  # an independent percentile bootstrap: resample, sort, mean of the middle half
        x = np.sort(rng.choice(scores, size=7))
        reference.append(x[1:6].mean())  # trim_mean(0.25) of 7 cuts int(1.75) = 1 from each end
    assert s["iqm_low"] == pytest.approx(np.percentile(reference, 2.5), abs=0.01)
    assert s["iqm_high"] == pytest.approx(np.percentile(reference, 97.5), abs=0.01)


def test_one_seed_has_no_interval_and_no_spread():
    s = seed_summary([0.7], BOOT)
    assert s["iqm"] == 0.7 and s["mean"] == 0.7
    assert math.isnan(s["std"]) and math.isnan(s["iqm_low"]) and math.isnan(s["iqm_high"])


def test_stratified_bootstrap_resamples_seeds_within_each_task():
    low_task, high_task = [0.10, 0.12, 0.14, 0.16], [0.90, 0.92, 0.94, 0.96]
    s = stratified_iqm([low_task, high_task], Bootstrap(resamples=3000, seed=0))
    assert s["iqm"] == pytest.approx(np.mean([0.14, 0.16, 0.90, 0.92]))  # the middle half of the 8 pooled scores
    assert s["n"] == 8 and s["tasks"] == 2
    # every resample keeps 4 scores of each task, so the pooled middle half always straddles the two
    # tasks: the IQM stays between their extremes, never the mean of one task alone
    assert 0.12 < s["iqm_low"] < s["iqm"] < s["iqm_high"] < 0.94
    rng = np.random.default_rng(5)
    reference = []
    for _ in range(3000):
        pooled = np.sort(np.concatenate([rng.choice(low_task, 4), rng.choice(high_task, 4)]))
        reference.append(pooled[2:6].mean())
    assert s["iqm_low"] == pytest.approx(np.percentile(reference, 2.5), abs=0.01)
    assert s["iqm_high"] == pytest.approx(np.percentile(reference, 97.5), abs=0.01)


def test_a_task_with_one_seed_enters_every_resample_unchanged():
    s = stratified_iqm([[0.5], [0.5], [0.1, 0.9]], BOOT)
    # the third task resamples to (0.1, 0.1), (0.1, 0.9) or (0.9, 0.9); with both 0.5s in every
    # resample their IQMs are 0.3, 0.5 and 0.7 (without them they would be 0.1, 0.5 and 0.9)
    assert s["iqm"] == 0.5 and s["iqm_low"] == pytest.approx(0.3) and s["iqm_high"] == pytest.approx(0.7)
    alone = stratified_iqm([[0.4], [0.6]], BOOT)
    assert alone["iqm"] == 0.5 and math.isnan(alone["iqm_low"])


def test_bootstrap_settings_are_checked():
    assert Bootstrap.from_dict({"resamples": 100}, "params.yaml report.bootstrap").resamples == 100
    with pytest.raises(ConfigError, match=r"^params.yaml report.bootstrap.resamples: 50 is not an integer >= 100$"):
        Bootstrap.from_dict({"resamples": 50}, "params.yaml report.bootstrap")
    with pytest.raises(ConfigError, match="confidence: 95 is not a number in"):
        Bootstrap.from_dict({"confidence": 95}, "params.yaml report.bootstrap")
    with pytest.raises(ConfigError, match="unknown key 'samples'"):
        Bootstrap.from_dict({"samples": 100}, "params.yaml report.bootstrap")


def test_normalizer_json_in_geobench_format(tmp_path):
    path = tmp_path / "normalizer.json"
    path.write_text(json.dumps({"m-eurosat": [0.5, 0.9], "m-brick-kiln": [0.8, 1]}))  # Normalizer.save's format
    ranges = read_normalizer(path)
    assert ranges == {"m-eurosat": (0.5, 0.9), "m-brick-kiln": (0.8, 1.0)}
    assert normalise([0.5, 0.7, 0.9, 1.0], *ranges["m-eurosat"]) == pytest.approx([0.0, 0.5, 1.0, 1.25])
    path.write_text(json.dumps({"m-eurosat": [0.9, 0.5]}))
    with pytest.raises(UserError, match=r"'m-eurosat' is \[0.9, 0.5\]; expected \[min, max\] with max > min"):
        read_normalizer(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not readable as JSON"):
        read_normalizer(path)

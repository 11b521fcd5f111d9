"""The champion rule as a pure function of the registry's records (steps.champion): the same
answer for versions that decided one after another and for versions that decided at once."""

import pytest

from steps.champion import RECORD_TAG, Anchor, Record, Score, margin, settle

IMAGES = 5000  # two standard errors at 0.80: 0.0113


def scored(accuracy: float, base: str | None = None, base_accuracy: float | None = None, digest: str = "d1",
           split: str = "val") -> dict[str, str]:
    """A version's tags as main leaves them: its score tags and its record."""
    record = Record(Score(accuracy, split, digest, IMAGES), base, base_accuracy)
    return {f"{split}_accuracy": repr(accuracy), f"{split}_digest": digest, RECORD_TAG: record.to_json()}


def test_versions_that_decided_in_turn_keep_their_decisions():
    # Each decided against the champion it found: v1 none, v2 v1 (kept), v3 v1 (promoted), v4 v3 (kept).
    versions = {"1": scored(0.80), "2": scored(0.81, "1", 0.80), "3": scored(0.85, "1", 0.80),
                "4": scored(0.70, "3", 0.85)}
    outcome = settle(None, versions)
    assert (outcome.champion, outcome.challenger) == ("3", "4")
    assert outcome.decisions == {
        "1": "promoted: 0.8000 val accuracy on 5000 images, no champion before",
        "2": "kept: 0.8100 vs champion v1 0.8000 + margin 0.0113 (2 standard errors), val accuracy on 5000 images",
        "3": "promoted: 0.8500 vs champion v1 0.8000 + margin 0.0113 (2 standard errors), val accuracy on 5000 images",
        "4": "kept: 0.7000 vs champion v3 0.8500 + margin 0.0101 (2 standard errors), val accuracy on 5000 images",
    }


@pytest.mark.parametrize("first, second, champion", [
    (0.60, 0.80, "2"),  # the later one is better by more than the margin: it wins
    (0.80, 0.60, "1"),  # the earlier one is better: the later one is kept
    (0.80, 0.81, "1"),  # within the margin of each other: the one registered first stays
    (0.81, 0.80, "1"),
])
def test_two_versions_that_found_no_champion_at_once(first, second, champion):
    """Both found no champion and both would have taken it; the rule orders them by version."""
    outcome = settle(None, {"1": scored(first), "2": scored(second)})
    assert outcome.champion == champion and outcome.challenger == "2"


def test_two_versions_that_both_beat_the_same_champion():
    # v1 0.80 is champion; v2 (0.82) and v3 (0.825) both beat it by more than 0.0113, and found
    # it at the same time. v3 beats v2 by less than v2's margin (0.0109): v2, registered first, stays.
    base = {"1": scored(0.80)}
    outcome = settle(None, {**base, "2": scored(0.82, "1", 0.80), "3": scored(0.825, "1", 0.80)})
    assert outcome.champion == "2"
    assert outcome.decisions["3"].startswith("kept: 0.8250 vs champion v2 0.8200 + margin 0.0109")
    # By more than the margin, the later one takes it.
    assert settle(None, {**base, "2": scored(0.82, "1", 0.80), "3": scored(0.84, "1", 0.80)}).champion == "3"
    # A worse one that was kept against v1 is kept against v2 too.
    assert settle(None, {**base, "2": scored(0.82, "1", 0.80), "3": scored(0.75, "1", 0.80)}).champion == "2"


def test_a_champion_scored_on_other_images():
    # v1 was scored on other validation images; v2 measured it on its own (0.70) and beat it.
    versions = {"1": scored(0.90, digest="old"), "2": scored(0.80, "1", 0.70)}
    assert settle(None, versions).champion == "2"
    # v3 decided at the same time as v2, also against v1, on yet other images: what v2 scored on
    # those images was never measured, so v3 cannot take the champion from v2.
    versions["3"] = scored(0.95, "1", 0.70, digest="new")
    outcome = settle(None, versions)
    assert outcome.champion == "2"
    assert outcome.decisions["3"] == "kept: champion v2 was scored on other val images, not these " \
                                     "(val accuracy on 5000 images)"


def test_a_promotion_by_hand_is_where_the_rule_starts_again():
    versions = {"1": scored(0.80), "2": scored(0.85, "1", 0.80)}
    assert settle(None, versions).champion == "2"
    # Rolled back by hand to v1 after v2: v2 no longer competes; v3 is compared against v1.
    anchor = Anchor("1", after=2)
    assert settle(anchor, versions).champion == "1"
    versions["3"] = scored(0.805, "1", 0.80)
    assert settle(anchor, versions).champion == "1"
    versions["4"] = scored(0.83, "1", 0.80)
    assert settle(anchor, versions).champion == "4"
    assert set(settle(anchor, versions).decisions) == {"3", "4"}


def test_a_registry_from_before_the_records_keeps_its_champion():
    # v1..v3 have no records (older code, or registered by hand); v2 is champion. v4 found v2.
    legacy = {"1": {"val_accuracy": "0.9", "val_digest": "d1"}, "2": {"val_accuracy": "0.8", "val_digest": "d1"},
              "3": {}}
    assert settle(None, legacy) is None  # nothing recorded: nothing to settle
    outcome = settle(None, {**legacy, "4": scored(0.805, "2", 0.80)})
    assert outcome.champion == "2" and outcome.challenger == "4"
    assert settle(None, {**legacy, "4": scored(0.85, "2", 0.80)}).champion == "4"


def test_a_deleted_champion_is_no_champion():
    outcome = settle(Anchor("7", after=7), {"8": scored(0.5, "7", 0.9)})
    assert outcome.champion == "8" and outcome.decisions["8"].endswith("no champion before")


def test_an_unreadable_record_is_not_a_decision():
    versions = {"1": scored(0.80), "2": {**scored(0.99, "1", 0.80), RECORD_TAG: "{not json"}}
    assert settle(None, versions).champion == "1"


def test_margin():
    assert margin(0.80, 5000) == pytest.approx(0.011314, abs=1e-6)
    assert margin(1.0, 200) == 0.0

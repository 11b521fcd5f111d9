"""The champion rule, as a pure function of what the registry records.

A version the pipeline registers records, in its RECORD_TAG, the score it is chosen on and the
champion it was compared against when it decided. `champion` is then defined as if the versions
had decided one after another in registration order (version number): each takes `champion`
only if it beats the champion before it on the same images by more than the margin. So two
versions registered at the same time (two users' `main` against one server) settle on the same
answer whichever finishes last: the better one, or, when they are within the margin of each
other, the one registered first, as it would have been had they run one after the other.

A promotion by hand (steps.registry.promote) is an ANCHOR_TAG on the registered model: that
version is champion once every version up to `after` has decided, and only versions registered
later are compared against it. Without one, the sequence starts from the champion that the first
recorded version found, so a registry from before these records keeps its champion.
"""

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

RECORD_TAG = "champion_record"  # on a model version: the score and base its decision was taken on
ANCHOR_TAG = "champion_anchor"  # on the registered model: the last promotion by hand

# A challenger must beat the champion by this many standard errors of the champion's accuracy
# on the decision images: two, so that equal models swap it by chance about 2% of the time.
PROMOTION_MARGIN_SE = 2.0


@dataclass(frozen=True)
class Score:
    """What a version is chosen on: its accuracy on one set of images."""
    accuracy: float
    split: str  # "val", or "test" when the data has no validation split
    digest: str  # of those images: only scores on the same images compare
    images: int


@dataclass(frozen=True)
class Record:
    """A version's RECORD_TAG: what its decision was taken on."""
    score: Score
    base: str | None  # the champion when it decided; None = there was none
    base_accuracy: float | None  # that champion's accuracy on score's images (measured if it was scored on others)

    def to_json(self) -> str:
        return json.dumps({"accuracy": self.score.accuracy, "split": self.score.split, "digest": self.score.digest,
                           "images": self.score.images, "base": self.base, "base_accuracy": self.base_accuracy})

    @classmethod
    def from_json(cls, text: str) -> "Record":
        d = json.loads(text)
        score = Score(float(d["accuracy"]), str(d["split"]), str(d["digest"]), int(d["images"]))
        base_accuracy = None if d["base_accuracy"] is None else float(d["base_accuracy"])
        return cls(score, None if d["base"] is None else str(d["base"]), base_accuracy)


@dataclass(frozen=True)
class Anchor:
    """The registered model's ANCHOR_TAG: `version` is champion once versions 1..after decided."""
    version: str | None
    after: int

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "after": self.after})

    @classmethod
    def from_json(cls, text: str) -> "Anchor":
        d = json.loads(text)
        return cls(None if d["version"] is None else str(d["version"]), int(d["after"]))


@dataclass(frozen=True)
class Outcome:
    champion: str | None  # None: no version exists to be champion
    challenger: str | None  # the newest version with a record
    decisions: dict[str, str]  # each recorded version after the anchor: its decision, in words


def margin(accuracy: float, images: int) -> float:
    """PROMOTION_MARGIN_SE standard errors of an accuracy measured on `images` images."""
    return PROMOTION_MARGIN_SE * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(images, 1))


def decide(score: Score, champion: str | None, champion_accuracy: float | None) -> tuple[bool, str]:
    """(whether a version with `score` takes `champion`, the decision in words). champion_accuracy
    is the champion's accuracy on the same images, None when it is not known there."""
    on = f"{score.split} accuracy on {score.images} images"
    if champion is None:
        return True, f"promoted: {score.accuracy:.4f} {on}, no champion before"
    if champion_accuracy is None:
        return False, f"kept: champion v{champion} was scored on other {score.split} images, not these ({on})"
    needed = margin(champion_accuracy, score.images)
    moved = score.accuracy > champion_accuracy + needed
    return moved, (f"{'promoted' if moved else 'kept'}: {score.accuracy:.4f} vs champion v{champion} "
                   f"{champion_accuracy:.4f} + margin {needed:.4f} ({PROMOTION_MARGIN_SE:g} standard errors), {on}")


def record_of(tags: Mapping[str, str]) -> Record | None:
    """A version's record, None when it has none (registered by hand, by older code, or still
    deciding) or an unreadable one."""
    try:
        return Record.from_json(tags[RECORD_TAG])
    except (KeyError, ValueError, TypeError):
        return None


def score_on(tags: Mapping[str, str], split: str) -> tuple[float, str] | None:
    """(accuracy, digest) of a version on `split`: its record's, or its `<split>_accuracy` and
    `<split>_digest` tags (which main sets on every version it registers)."""
    record = record_of(tags)
    if record is not None and record.score.split == split:
        return record.score.accuracy, record.score.digest
    try:
        return float(tags[f"{split}_accuracy"]), tags[f"{split}_digest"]
    except (KeyError, ValueError):
        return None


def accuracy_against(record: Record, champion: str, champion_tags: Mapping[str, str]) -> float | None:
    """The champion's accuracy on the images `record` was scored on: as measured when the version
    decided against it, or from the champion's own score on the same images; None if neither."""
    if record.base == champion and record.base_accuracy is not None:
        return record.base_accuracy
    known = score_on(champion_tags, record.score.split)
    if known is not None and known[1] == record.score.digest:
        return known[0]
    return None


def settle(anchor: Anchor | None, versions: Mapping[str, Mapping[str, str]]) -> Outcome | None:
    """The champion the rule gives for these versions (version -> tags) and the anchor; None when
    nothing is recorded to decide on."""
    recorded = {v: r for v, tags in versions.items() if (r := record_of(tags)) is not None}
    if anchor is None:
        if not recorded:
            return None
        first = min(recorded, key=int)
        anchor = Anchor(recorded[first].base, int(first) - 1)
    champion = anchor.version if anchor.version in versions else None  # a deleted version is no champion
    decisions = {}
    for version in sorted((v for v in recorded if int(v) > anchor.after), key=int):
        if version == champion:
            continue
        record = recorded[version]
        against = None if champion is None else accuracy_against(record, champion, versions[champion])
        moved, decisions[version] = decide(record.score, champion, against)
        if moved:
            champion = version
    challenger = max(recorded, key=int) if recorded else None
    return Outcome(champion, challenger, decisions)

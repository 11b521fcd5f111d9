"""The Model Registry side: register a candidate, decide on `champion`, promote and roll back.

Aliases and version tags only; registry stages are deprecated in MLflow 3. `challenger` marks
the newest version the pipeline registered; `champion` is what serving should use. It moves
when a candidate beats it on the same validation images by more than PROMOTION_MARGIN_SE
standard errors (so two equal models do not swap it on noise), or by hand with `promote`. The
test set is reported on every version and never decides.

Several `main`s and `promote`s may share one registry (a team's `mlflow server`), and MLflow
has no compare-and-set for an alias: each writes what it decided, then settles. A version
records what it decided on (steps.champion), and settle_aliases points the aliases where the
rule puts them given every record in the registry, re-reading after each write until a read
changes nothing; whichever process settles last so leaves the same answer, on any store.
"""

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from steps.champion import (ANCHOR_TAG, PROMOTION_MARGIN_SE, RECORD_TAG, Anchor, Outcome, Record, Score,  # noqa: F401
                            margin, settle)
from steps.errors import StepError, first_line
from steps.runtime import retry

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
SETTLE_ROUNDS = 10  # each round reads the registry; one that writes nothing ends it


@dataclass(frozen=True)
class Candidate:
    model: str  # architecture name
    test_accuracy: float
    train_run_id: str
    eval_run_id: str
    val_accuracy: float | None = None  # None when the data has no validation split


def set_alias(client: MlflowClient, name: str, alias: str, version: int | str, attempts: int = 5,
              delay_s: float = 0.05) -> None:
    """Point `alias` at `version`, retrying when another process sets the same alias at the same
    moment. MLflow's SQL store sets an alias by reading whether it exists and then updating or
    inserting; two first-time setters both insert, and the loser gets an IntegrityError (as an
    MlflowException). On a retry the alias exists, so it is updated. After `attempts` failures
    the error is reported in one line."""
    try:
        retry(partial(client.set_registered_model_alias, name, alias, version), attempts, delay_s, MlflowException)
    except MlflowException as exc:
        reason = first_line(exc) or type(exc).__name__
        raise StepError(f"could not point {alias!r} of {name!r} at v{version}: {reason}") from None


def version_or_none(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def served_weights_dir(model_uri: str, dst: Path) -> Path:
    """The weights folder inside a logged pyfunc model (its artifact `weights`)."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    found = [p.parent for p in root.rglob("model_config.json")]
    if len(found) != 1:
        raise StepError(f"{model_uri}: expected one weights folder in the model, found {len(found)}")
    return found[0]


def accuracy_on(model_uri: str, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 accuracy of a registered model on these images, through the shared forward path."""
    from cifar_models.inference import load_network, predict_logits  # torch: only when needed

    with tempfile.TemporaryDirectory() as tmp:
        model, spec = load_network(served_weights_dir(model_uri, Path(tmp)))
        logits = predict_logits(model, test_x, spec.mean, spec.std)
    return float((logits.argmax(1).numpy() == test_y).mean())


def champion_accuracy(champion, name: str, score: Score, x: np.ndarray, y: np.ndarray) -> float:
    """The champion's accuracy on the decision images: its recorded figure when it was measured on
    the same images, else measured now."""
    recorded = champion.tags.get(f"{score.split}_accuracy")
    if champion.tags.get(f"{score.split}_digest") == score.digest and recorded is not None:
        return float(recorded)
    log.info("champion v%s was evaluated on other %s data; evaluating it on these images", champion.version,
             score.split)
    return accuracy_on(f"models:/{name}/{champion.version}", x, y)


def note_champion(client: MlflowClient, name: str, version: str, decision: str) -> None:
    """Append to the version's description (its model card) when and why it became champion,
    unless its last line says so already (two processes settling on it at once)."""
    description = client.get_model_version(name, version).description or ""
    last = description.rstrip().rsplit("\n\n", 1)[-1]
    if last.startswith("Became champion on ") and last.endswith(f": {decision}"):
        return
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    client.update_model_version(name, version, description=f"{description.rstrip()}\n\nBecame champion on {when}: "
                                                           f"{decision}\n")


def all_versions(client: MlflowClient, name: str) -> dict[str, dict[str, str]]:
    """Every version of the registered model: version -> its tags."""
    versions, token = {}, None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        versions.update({str(v.version): dict(v.tags) for v in page})
        token = page.token
        if not token:
            return versions


def read_anchor(client: MlflowClient, name: str) -> Anchor | None:
    text = client.get_registered_model(name).tags.get(ANCHOR_TAG)
    try:
        return None if text is None else Anchor.from_json(text)
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable %s tag %r; ignored", name, ANCHOR_TAG, text)
        return None


def write_anchor(client: MlflowClient, name: str, text: str | None, attempts: int = 5, delay_s: float = 0.05) -> None:
    """Set the ANCHOR_TAG (or delete it, for None), retrying as set_alias does: the SQL store
    inserts a first tag as it inserts a first alias."""
    write = (partial(client.delete_registered_model_tag, name, ANCHOR_TAG) if text is None
             else partial(client.set_registered_model_tag, name, ANCHOR_TAG, text))
    try:
        retry(write, attempts, delay_s, MlflowException)
    except MlflowException as exc:
        raise StepError(f"could not record the promotion on {name!r}: {first_line(exc) or type(exc).__name__}") from None


def settle_aliases(client: MlflowClient, name: str, notes: Mapping[str, str] | None = None) -> Outcome | None:
    """Point `champion` and `challenger` where steps.champion.settle puts them given the registry's
    records, reading again after every write until a round finds nothing to change: a process
    that wrote before another's records were readable, or that overwrote another's settled
    alias, so corrects itself. The version this leaves as champion, if it moved `champion` there,
    gets a line in its card: notes[v] or its decision. Returns the outcome; None (and no change)
    when nothing is recorded."""
    moved = None  # the last version this process pointed `champion` at
    for _ in range(SETTLE_ROUNDS):
        outcome = settle(read_anchor(client, name), all_versions(client, name))
        if outcome is None:
            return None
        wrote = False
        for alias, target in ((CHAMPION, outcome.champion), (CHALLENGER, outcome.challenger)):
            current = version_or_none(client, name, alias)
            if target is None or (current is not None and str(current.version) == target):
                continue
            set_alias(client, name, alias, target)
            wrote = True
            moved = target if alias == CHAMPION else moved
        if not wrote:
            if moved is not None and moved == outcome.champion:  # not one this process wrote and then corrected
                why = (notes or {}).get(moved) or outcome.decisions.get(moved, "settled from the registry's records")
                note_champion(client, name, moved, why)
            return outcome
    raise StepError(f"the aliases of {name!r} did not settle in {SETTLE_ROUNDS} rounds: other processes keep moving them")


def decide_champion(client: MlflowClient, name: str, version, score: Score, x: np.ndarray, y: np.ndarray) -> bool:
    """Record what `version` decides on: its score, and the current champion's accuracy on the same
    images (measured now if it was scored on others); then settle the aliases (settle_aliases).
    `version` is champion if it beats the champion before it by more than the margin, or there
    is none, or, with other versions deciding at the same time, as steps.champion defines.
    Returns whether it is champion; its decision goes to the log and its `champion_decision` tag."""
    champion = version_or_none(client, name, CHAMPION)
    base_accuracy = None if champion is None else champion_accuracy(champion, name, score, x, y)
    record = Record(score, None if champion is None else str(champion.version), base_accuracy)
    client.set_model_version_tag(name, version.version, RECORD_TAG, record.to_json())
    outcome = settle_aliases(client, name)
    mine = str(version.version)
    decision = outcome.decisions.get(mine, f"kept: v{outcome.champion} was made champion by hand after this "
                                           "version was registered")
    client.set_model_version_tag(name, mine, "champion_decision", decision)
    log.info("v%s: %s", mine, decision)
    if decision.startswith("promoted") and outcome.champion != mine:
        log.info("v%s, decided at the same time, then beat v%s: %s is on v%s", outcome.champion, mine, CHAMPION,
                 outcome.champion)
    return outcome.champion == mine


def promote(name: str, version: int | str, client: MlflowClient | None = None) -> tuple[str | None, str]:
    """Point `champion` at `version` (forward, or back for a rollback). Refuses a version that
    does not exist or whose runs did not finish. Recorded as the registry's ANCHOR_TAG, so that
    versions registered before it no longer compete and later ones are compared against it.
    Returns (old version or None, new version)."""
    client = client or MlflowClient()
    version = str(version)
    try:
        target = client.get_model_version(name, version)
    except MlflowException:
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        except MlflowException:
            known = []
        if not known:
            raise StepError(f"registered model {name!r} has no version {version} (it has no versions)") from None
        raise StepError(f"registered model {name!r} has no version {version}; versions: "
                        f"{', '.join(map(str, known))}") from None
    # The run that logged the model, and the training and evaluation runs it records.
    for run_id in filter(None, {target.run_id, target.tags.get("train_run_id"), target.tags.get("eval_run_id")}):
        try:
            status = client.get_run(run_id).info.status
        except MlflowException:
            raise StepError(f"v{version} of {name!r} comes from run {run_id}, which no longer exists") from None
        if status != "FINISHED":
            raise StepError(f"v{version} of {name!r} was registered from run {run_id}, which is {status}; refusing")
    old = version_or_none(client, name, CHAMPION)
    before = client.get_registered_model(name).tags.get(ANCHOR_TAG)
    write_anchor(client, name, Anchor(version, max(map(int, all_versions(client, name)))).to_json())
    why = f"promoted by hand (cifar10-promote), champion before: {f'v{old.version}' if old else 'none'}"
    try:
        outcome = settle_aliases(client, name, notes={version: why})
    except StepError:
        try:  # the promotion failed: it must not take effect at the next settle either
            write_anchor(client, name, before)
        except StepError as exc:
            log.warning("%s", exc)
        raise
    return (str(old.version) if old else None), outcome.champion

"""The Model Registry side: register a candidate, decide on `champion`, promote and roll back.

Aliases and version tags only; registry stages are deprecated in MLflow 3. `challenger` marks
the newest version the pipeline registered; `champion` is what serving should use. It moves
when a candidate beats it on the same validation images by more than PROMOTION_MARGIN_SE
standard errors (so two equal models do not swap it on noise), or by hand with `promote`. The
test set is reported on every version and never decides.
"""

import logging
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from steps.errors import StepError, first_line
from steps.runtime import retry

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


# A challenger must beat the champion by this many standard errors of the champion's accuracy
# on the decision images: two, so that equal models swap it by chance about 2% of the time.
PROMOTION_MARGIN_SE = 2.0


@dataclass(frozen=True)
class Candidate:
    model: str  # architecture name
    test_accuracy: float
    train_run_id: str
    eval_run_id: str
    val_accuracy: float | None = None  # None when the data has no validation split


@dataclass(frozen=True)
class Score:
    """What a version is chosen on: its accuracy on one set of images."""
    accuracy: float
    split: str  # "val", or "test" when the data has no validation split
    digest: str  # of those images: only scores on the same images compare
    images: int


def margin(accuracy: float, images: int) -> float:
    """PROMOTION_MARGIN_SE standard errors of an accuracy measured on `images` images."""
    return PROMOTION_MARGIN_SE * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(images, 1))


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
    """Append to the version's description (its model card) when and why it became champion."""
    description = client.get_model_version(name, version).description or ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    client.update_model_version(name, version, description=f"{description.rstrip()}\n\nBecame champion on {when}: "
                                                           f"{decision}\n")


def decide_champion(client: MlflowClient, name: str, version, score: Score, x: np.ndarray, y: np.ndarray) -> bool:
    """Move `champion` to `version` if it beats the current champion on the same images by more
    than the margin (or there is none). Returns whether it moved; the decision, both numbers and
    the margin go to the log and the version's `champion_decision` tag."""
    champion = version_or_none(client, name, CHAMPION)
    on = f"{score.split} accuracy on {score.images} images"
    if champion is None:
        decision = f"promoted: {score.accuracy:.4f} {on}, no champion before"
        moved = True
    else:
        best = champion_accuracy(champion, name, score, x, y)
        needed = margin(best, score.images)
        moved = score.accuracy > best + needed
        decision = (f"{'promoted' if moved else 'kept'}: {score.accuracy:.4f} vs champion v{champion.version} "
                    f"{best:.4f} + margin {needed:.4f} ({PROMOTION_MARGIN_SE:g} standard errors), {on}")
    client.set_model_version_tag(name, version.version, "champion_decision", decision)
    if moved:
        set_alias(client, name, CHAMPION, version.version)
        note_champion(client, name, version.version, decision)
    log.info("v%s: %s", version.version, decision)
    return moved


def promote(name: str, version: int | str, client: MlflowClient | None = None) -> tuple[str | None, str]:
    """Point `champion` at `version` (forward, or back for a rollback). Refuses a version that
    does not exist or whose runs did not finish. Returns (old version or None, new version)."""
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
    set_alias(client, name, CHAMPION, version)
    if old is None or str(old.version) != version:
        note_champion(client, name, version, f"promoted by hand (cifar10-promote), champion before: "
                                             f"{f'v{old.version}' if old else 'none'}")
    return (str(old.version) if old else None), version

"""The model card: a registered version's description, in Markdown, as the MLflow UI shows it.

Built only from what the runs recorded (train's params, tags and metrics, evaluate's metrics,
tags and tables), so the card says what was measured and nothing more.
"""

from dataclasses import dataclass

import pandas as pd

from cifar_models.preprocess import CLASSES

# Train params worth a reader's eye, in this order; the rest are in the train run.
RECIPE_PARAMS = ("epochs", "batch_size", "optimizer", "max_lr_used", "weight_decay", "label_smoothing", "aug",
                 "schedule", "ema", "seed")


@dataclass(frozen=True)
class CardInputs:
    name: str  # registered model name
    version: str
    train_run: object  # mlflow.entities.Run of train
    eval_run: object  # mlflow.entities.Run of evaluate
    per_class: pd.DataFrame  # evaluate's per_class_accuracy.csv
    ood: pd.DataFrame  # evaluate's ood.csv
    data_run_id: str
    pipeline_run_id: str
    data_source: str  # download_data's source (cifar10, synthetic, a local copy)


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def resolved(params: dict[str, str], key: str) -> str:
    """What train ran with: a value left to the recipe is logged as `recipe`, and what the recipe
    gave as <key>_resolved (steps.options.recipe_param)."""
    return params.get(f"{key}_resolved", params[key])


def model_card(c: CardInputs) -> str:
    train, evaluate = c.train_run.data, c.eval_run.data
    p, m, em, tags = train.params, train.metrics, evaluate.metrics, evaluate.tags
    recipe = p.get("recipe_resolved") or p.get("recipe", "?")
    model = p.get("model", "?")
    test_images = int(c.per_class["total"].sum())
    hardware = train.tags.get("hardware") or train.tags.get("device", "?")
    seconds = m.get("train_seconds")
    score = tags.get("unknown_score", "?")
    mine = c.ood[c.ood["score"] == score]
    lines = [
        f"# {c.name} v{c.version}: {model}, `{recipe}` recipe",
        "",
        "CIFAR-10 classifier served with calibrated probabilities and an `unknown` flag.",
        "",
        "## Model and recipe",
        f"- Architecture `{model}`, recipe `{recipe}`: "
        + ", ".join(f"{k} {resolved(p, k)}" for k in RECIPE_PARAMS if k in p) + ".",
        f"- Data: `{c.data_source}`, digest `{p.get('data_digest', '?')}`.",
        f"- Training: {_f(seconds, 0)} s on {hardware}"
        f" ({train.tags.get('precision', '?')}).",
        "",
        f"## Accuracy on {test_images} test images",
        "| | accuracy |",
        "| --- | --- |",
        f"| one forward (served) | {_f(em.get('test_accuracy'))} |",
        f"| mirror TTA | {_f(em.get('test_accuracy_flip_tta'))} |",
        f"| mirror and shift TTA | {_f(em.get('test_accuracy_tta'))} |",
        f"| validation split (one forward) | {_f(em.get('val_accuracy'))} |",
        "",
        "| class | " + " | ".join(c.per_class["class"]) + " |",
        "| --- " * (len(c.per_class) + 1) + "|",
        "| accuracy | " + " | ".join(f"{a:.3f}" for a in c.per_class["accuracy"]) + " |",
        "",
        "## Calibration",
        f"- Temperature {_f(em.get('temperature'), 3)}, fitted on: {tags.get('calibration_split', '?')}"
        " (measured on the test set).",
        f"- Test NLL {_f(em.get('test_nll'))} → {_f(em.get('test_nll_calibrated'))}; "
        f"expected calibration error (15 bins) {_f(em.get('test_ece'))} → {_f(em.get('test_ece_calibrated'))}.",
        "",
        "## `unknown`",
        f"- Score `{score}`, threshold {em.get('unknown_threshold', float('nan')):.6g}, set to accept 95% of "
        f"held-out in-distribution images; it accepts {_f(em.get('unknown_accept_rate_test'))} of the test images.",
        "",
        "| foreign source | images | AUROC | false-accept rate |",
        "| --- | --- | --- | --- |",
        *(f"| {r.source} | {r.images} | {r.auroc:.3f} | {r.accept_rate:.3f} |"
          for r in mine.itertuples() if r.source != "cifar10_test"),
        "",
        "## Runs",
        f"- train `{c.train_run.info.run_id}`, evaluate `{c.eval_run.info.run_id}`, "
        f"download_data `{c.data_run_id}`, main `{c.pipeline_run_id}`.",
        "",
        "## Intended use and limits",
        f"- For small colour photos of one of ten things: {', '.join(CLASSES)}. "
        "It sees every image squashed to 32x32 pixels, as CIFAR-10's are.",
        "- Anything else still gets one of the ten labels and probabilities; `unknown` true says the image is "
        "probably none of them. It was measured only on the foreign sources above (synthetic images and "
        "scikit-image's photos and faces); on other images its rate is not known. About 5% of genuine "
        "CIFAR-like images are flagged too.",
        "- The probabilities are calibrated on CIFAR-10 images; on photos unlike them they are not known to be.",
        "- Not for decisions about people: a face is none of the classes.",
    ]
    return "\n".join(lines) + "\n"

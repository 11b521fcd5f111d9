"""cifar10-predict: classify image files and print one line per file, `file<TAB>label<TAB>confidence`.

With --url, the images go to a running endpoint (`mlflow models serve`) as the curl-and-base64
request people would otherwise write by hand; without it, the model is loaded in this process.
A file that cannot be read or that the model refuses gets `file<TAB>error: <why>` on stderr, the
others still get their answer, and the exit code is 1 if any failed.
"""

import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click
import pandas as pd

from cifar_models.pyfunc import INPUT_COLUMN
from steps.classify import ERROR_COLUMN, classify, error_rows, image_error
from steps.errors import StepError
from steps.predict import CHAMPION_URI, load_model

REQUEST_IMAGES = 64  # images per request: the served model's forward chunk
TIMEOUT_S = 60


def post_images(url: str, images: list[bytes]) -> pd.DataFrame:
    """The endpoint's rows for images, or a one-image error row when it refuses the request."""
    body = json.dumps({"dataframe_split": {"columns": [INPUT_COLUMN],
                                           "data": [[base64.b64encode(i).decode()] for i in images]}})
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as reply:
            rows = pd.DataFrame(json.load(reply)["predictions"])
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and len(images) == 1:
            try:
                message = json.loads(exc.read()).get("message", "")
            except ValueError:
                message = f"HTTP {exc.code}"
            return error_rows([image_error(message)])
        if 400 <= exc.code < 500:  # one bad image refuses the request: ask again one by one
            return pd.concat([post_images(url, [i]) for i in images], ignore_index=True)
        raise StepError(f"{url} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StepError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    rows[ERROR_COLUMN] = None
    return rows


def classify_files(files: list[str], url: str | None, model_uri: str) -> pd.DataFrame:
    """One row per file, in order: `file` and steps.classify's columns."""
    model = None if url else load_model(model_uri)
    parts = []
    for start in range(0, len(files), REQUEST_IMAGES):
        names = files[start:start + REQUEST_IMAGES]
        images, unreadable = [], {}
        for i, name in enumerate(names):
            try:
                images.append(Path(name).read_bytes())
            except OSError as exc:
                unreadable[i] = f"cannot read the file: {exc.strerror or exc}"
        rows = post_images(url, images) if url else classify(model, images)
        rows = rows.to_dict("records") if len(images) else []
        it = iter(rows)
        merged = [error_rows([unreadable[i]]).iloc[0].to_dict() if i in unreadable else next(it)
                  for i in range(len(names))]
        parts.append(pd.DataFrame(merged).assign(file=names))
    return pd.concat(parts, ignore_index=True)


@click.command(help=__doc__)
@click.argument("images", nargs=-1, required=True)
@click.option("--url", default=None, help="A running endpoint, e.g. http://127.0.0.1:5000; not given: load the model here.")
@click.option("--model-uri", default=CHAMPION_URI, show_default=True, help="The model to load when --url is not given.")
def cli(images: tuple[str, ...], url: str | None, model_uri: str) -> None:
    try:
        rows = classify_files(list(images), url, model_uri)
    except StepError as exc:
        raise click.ClickException(str(exc)) from None
    failed = 0
    for row in rows.itertuples(index=False):
        if isinstance(row.error, str):
            failed += 1
            click.echo(f"{row.file}\terror: {row.error}", err=True)
        else:
            click.echo(f"{row.file}\t{row.label}\t{row.confidence:.4f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    cli()

"""What `predict` reads: a folder of images (searched recursively), a tarball of images, or a
Parquet file with a column of image bytes, as chunks of (key, bytes) read one chunk at a time.

The key is what identifies an image in the output: its path relative to the folder, its name in
the tarball, or its row number in the Parquet file. Files are images by their suffix; names that
start with "." or "_" are skipped, files and folders alike, as Spark and Hadoop skip them, so both
engines see the same images.
"""

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cifar_models.pyfunc import INPUT_COLUMN
from steps.errors import StepError

# The suffixes of the formats the served model decodes (cifar_models.pyfunc.FORMATS).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Source:
    kind: str  # "folder", "tar" or "parquet"
    path: Path
    column: str = ""  # parquet: the column of image bytes

    @property
    def key(self) -> str:
        """The output's first column: a row number for Parquet, else a path."""
        return "row" if self.kind == "parquet" else "path"


@dataclass
class Chunk:
    keys: list  # str paths or int row numbers
    images: list  # bytes, or None where the image could not be read
    errors: list  # None, or why the image could not be read (then its image is None)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not is_hidden(name)


def is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def image_column(schema: pa.Schema, where: str) -> str:
    """`image` if the file has it, else its only binary column."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    if INPUT_COLUMN in binary:
        return INPUT_COLUMN
    if len(binary) == 1:
        return binary[0]
    raise StepError(f"{where}: no image column; expected a binary column '{INPUT_COLUMN}' "
                    f"(columns: {', '.join(f'{f.name} {f.type}' for f in schema) or 'none'})")


def open_source(input_path: str) -> Source:
    """The input checked as far as it can be without reading every image; StepError when it is
    missing, empty or of a kind predict cannot read."""
    path = Path(input_path).expanduser()
    if not path.exists():
        raise StepError(f"input {input_path} does not exist")
    if path.is_dir():
        if next(walk_images(path), None) is None:
            raise StepError(f"input {input_path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder "
                            "or below it")
        return Source("folder", path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:
            raise StepError(f"input {input_path}: not a readable Parquet file ({exc})") from None
        column = image_column(parquet.schema_arrow, f"input {input_path}")
        if parquet.metadata.num_rows == 0:
            raise StepError(f"input {input_path}: no rows")
        return Source("parquet", path, column)
    if tarfile.is_tarfile(path):
        return Source("tar", path)
    raise StepError(f"input {input_path}: not a folder, a tarball (.tar, .tar.gz) or a Parquet file "
                    f"({', '.join(PARQUET_SUFFIXES)})")


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files under folder, folder by folder in name order, without listing it all at once."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if is_image_name(name):
                yield Path(root) / name


def _folder_items(folder: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    for file in walk_images(folder):
        key = file.relative_to(folder).as_posix()
        try:
            yield key, file.read_bytes(), None
        except OSError as exc:
            yield key, None, f"cannot read the file: {exc.strerror or exc}"


def _tar_items(path: Path) -> Iterator[tuple[str, bytes | None, str | None]]:
    # Stream mode ("r|*"): members are read in order and never indexed, so a tarball of
    # millions of images costs no more memory than one image.
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                name = member.name.removeprefix("./")
                if not member.isfile() or not is_image_name(Path(name).name) \
                        or any(is_hidden(part) for part in Path(name).parts[:-1]):
                    continue
                yield name, archive.extractfile(member).read(), None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise StepError(f"input {path}: the tarball is damaged or truncated ({exc})") from None


def _parquet_items(path: Path, column: str, batch_rows: int) -> Iterator[tuple[int, bytes | None, str | None]]:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=[column]):
        for value in batch.column(0).to_pylist():
            yield row, value, None
            row += 1


def read_chunks(source: Source, size: int) -> Iterator[Chunk]:
    """The source's images, `size` at a time, in a stable order."""
    if source.kind == "folder":
        items = _folder_items(source.path)
    elif source.kind == "tar":
        items = _tar_items(source.path)
    else:
        items = _parquet_items(source.path, source.column, size)
    chunk = Chunk([], [], [])
    for key, image, error in items:
        chunk.keys.append(key)
        chunk.images.append(image)
        chunk.errors.append(error)
        if len(chunk.keys) == size:
            yield chunk
            chunk = Chunk([], [], [])
    if chunk.keys:
        yield chunk

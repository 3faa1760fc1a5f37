"""Atomic file writes: every output is written under a temporary name beside its target and renamed when
complete, so a reader (or a resumed run) never sees a half-written file, and a failed write leaves nothing. A folder
of outputs (one scan's) is written the same way, as a whole (``write_folder_atomically``). ``write_nifti`` is the
bundle's one NIfTI writer (prepared slices, masks, NAMs)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

__all__ = [
    "write_atomically",
    "write_folder_atomically",
    "write_text",
    "write_json",
    "read_json",
    "write_nifti",
    "file_hash",
    "sha256",
]


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary name beside ``path`` (with the same suffixes, so writers such as
    nibabel pick the same format), then rename it to ``path``; on failure the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix="".join(path.suffixes))
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def write_folder_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty folder beside ``path`` (named ``.tmp-<name>-*``) to write into; when the block ends without
    an error it replaces ``path`` (a folder there from an earlier run is removed), else it is removed with what was
    written in it. So ``path`` holds the earlier complete folder or the new complete one, never a part of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if not path.exists():
            os.replace(tmp, path)
            return
        # a non-empty folder cannot be renamed over: the earlier one is moved aside first, and back if that fails
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".old-{path.name}-"))
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old / path.name, path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON indented by 4 to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=4))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON content of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not valid UTF-8 JSON; the message names the file, the line and the column (a bare
            ``JSONDecodeError`` names neither the file nor what to fix).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file, so not JSON ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{path}: malformed JSON at {where}: {error.msg} (a truncated or hand-edited file?)") from None


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: type | None = None) -> None:
    """Write ``array`` as NIfTI to ``path`` atomically, its voxel-to-world ``affine`` ``(4, 4)`` as both the sform and
    the qform (scanner coordinates, mm); ``dtype`` is the stored type (default: the array's)."""
    array = np.asarray(array) if dtype is None else np.asarray(array).astype(dtype)
    affine = np.asarray(affine, float)
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    write_atomically(path, lambda tmp: nib.save(image, tmp))


def file_hash(path: str | os.PathLike, kind: str = "sha256") -> str:
    """The hex digest of a file's content by hashlib's algorithm ``kind``, streamed (weights may be hundreds of MB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, kind).hexdigest()


def sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's content."""
    return file_hash(path)

"""Where a trajectory store lives: opening one as a zarr group, and writing a whole store aside and
renaming it into place, so that an output path holds a complete store or nothing new.

A store is a local path or a URL (`s3://bucket/demo.zarr`, `gs://...`, `file:///...`), opened
through zarr's fsspec store; credentials and endpoints come from the filesystem's usual environment
variables (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import uuid
from typing import Iterator

import zarr

from il_policies.data.schema import StoreError, exc_text

__all__ = ["built_aside", "check_output_path", "is_url", "open_group", "store_location"]


# s3fs reads an object with max_concurrency > 1 by asking its size first (a HEAD), to split one larger
# than its block size into ranged GETs; a store's objects are ~2 MB, so that is a wasted round trip each.
_STORAGE_OPTIONS = {"s3": {"max_concurrency": 1}}


def is_url(path) -> bool:
    return isinstance(path, str) and "://" in path


def store_location(path) -> pathlib.Path | str:
    """A local path as a Path; a URL stays a string (a Path would fold its `//`)."""
    return path if is_url(path) else pathlib.Path(path)


def check_output_path(out: pathlib.Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`, and never overwrite something that is not a store."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise StoreError(f"trajectory store {out}: the path already exists (pass overwrite=True / --overwrite to replace it).")
        if not (out.is_dir() and ((out / "zarr.json").is_file() or (out / ".zgroup").is_file())):
            raise StoreError(f"trajectory store {out}: the path exists and is not a zarr group, so it will not be overwritten.")


@contextlib.contextmanager
def built_aside(out, overwrite: bool = False) -> Iterator[pathlib.Path]:
    """For whole-store writes (`TrajectoryStore.create`, converters): yield a temporary path next to
    `out` to write the store to; when the body finishes, move it into place (replacing `out` if
    `overwrite`). A failure or a kill leaves `out` as it was; what a killed write left aside is
    removed by the next one."""
    out = pathlib.Path(out)
    check_output_path(out, overwrite)
    for stale in out.parent.glob(f".{out.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.is_symlink():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_group(path, mode: str, zarr_format: int | None = None):
    """A local path or a URL as a zarr group (mode "w-" creates one, refusing an existing group)."""
    remote = is_url(path)
    if not remote:
        path = pathlib.Path(path)
        if not path.exists():
            raise StoreError(f"trajectory store {path}: the path does not exist.")
        if not path.is_dir():
            raise StoreError(f"trajectory store {path}: the path is a file, so not a zarr group.")
    place = "the URL" if remote else "the path"
    scheme = str(path).split("://")[0] if remote else None
    try:
        return zarr.open_group(str(path), mode=mode, use_consolidated=False, zarr_format=zarr_format,
                               storage_options=_STORAGE_OPTIONS.get(scheme))
    except ImportError as e:
        raise StoreError(f"trajectory store {path}: reading {scheme}:// URLs needs {e.name or 'its fsspec filesystem'} "
                         f"installed (s3fs for s3://, gcsfs for gs://).") from None
    except (zarr.errors.ContainsGroupError, FileExistsError):
        raise StoreError(f"trajectory store {path}: a store already exists there (pass overwrite=True / --overwrite to replace it).") from None
    except zarr.errors.ContainsArrayError:
        raise StoreError(f"trajectory store {path}: {place} holds a zarr array, not a zarr group.") from None
    except FileNotFoundError:  # GroupNotFoundError subclasses it
        raise StoreError(f"trajectory store {path}: {place} is not a zarr group.") from None
    except Exception as e:
        raise StoreError(f"trajectory store {path}: cannot open it as a zarr group ({exc_text(e)}).") from None

"""Plain ``--data cifar10``: the python version of CIFAR-10, downloaded once into a cache folder.

The folder is ``cifar10/`` under :data:`~search.data.cache.DECODED_CACHE_ENV` (default
``~/.cache/prune-search``; when that variable is empty, which only turns the decoded-image cache
off, the default folder). When ``cifar-10-batches-py`` is complete there it is used as it is;
otherwise torchvision downloads the archive (``CIFAR10.url``, with its progress bar and its MD5
check) and extracts it there. Offline, or when the download does not match its MD5, the error is
one line naming the URL and the folder to put the archive or its extracted folder into.
"""

from __future__ import annotations

import os
import tarfile
import urllib.error
from pathlib import Path

from search.data.cache import DECODED_CACHE_ENV
from search.errors import UsageError
from search.progress import Reporter

__all__ = ["CIFAR10_FILES", "cifar10_download_folder", "downloaded_cifar10"]

CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
"""The files of ``cifar-10-batches-py`` this tool reads."""


def cifar10_download_folder() -> Path:
    """Where plain ``--data cifar10`` keeps the data set (holds ``cifar-10-batches-py``)."""
    base = os.environ.get(DECODED_CACHE_ENV) or str(Path.home() / ".cache" / "prune-search")
    return Path(os.path.expanduser(base)) / "cifar10"


def downloaded_cifar10(reporter: Reporter) -> Path:
    """The cache folder holding a complete ``cifar-10-batches-py``, downloading it first if needed."""
    from torchvision.datasets import CIFAR10  # torchvision loads only when a download may be needed
    from torchvision.datasets.utils import download_and_extract_archive

    folder = cifar10_download_folder()
    extracted = folder / CIFAR10.base_folder
    if all((extracted / name).is_file() for name in CIFAR10_FILES):
        return folder
    archive = folder / CIFAR10.filename
    where = (
        f"put {CIFAR10.filename} (or the extracted {CIFAR10.base_folder}/) into {folder}, or pass --data cifar10:PATH"
    )
    reporter.info(f"CIFAR-10 is not in {folder} yet: downloading {CIFAR10.url} (about 163 MiB, MD5-checked)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR10.url, str(folder), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except urllib.error.URLError as error:  # offline, refused, name not resolved, HTTP errors
        raise UsageError(f"cannot download CIFAR-10 from {CIFAR10.url} ({_reason(error)}); {where}") from error
    except RuntimeError as error:  # torchvision: "File not found or corrupted." (the MD5 did not match)
        archive.unlink(missing_ok=True)
        raise UsageError(
            f"the CIFAR-10 archive downloaded from {CIFAR10.url} does not match its MD5 {CIFAR10.tgz_md5} "
            f"({_reason(error)}); try again, or {where}"
        ) from error
    except (tarfile.TarError, EOFError) as error:  # truncated or damaged, though its MD5 matched
        archive.unlink(missing_ok=True)
        raise UsageError(
            f"cannot extract the CIFAR-10 archive {archive} ({_reason(error)}); try again, or {where}"
        ) from error
    except OSError as error:  # a disk that is full or not writable, a connection reset, a damaged archive
        raise UsageError(
            f"cannot download CIFAR-10 from {CIFAR10.url} into {folder} ({_reason(error)}); {where}"
        ) from error
    archive.unlink(missing_ok=True)  # extracted: the archive is no longer needed
    return folder


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    text = str(reason if reason is not None else error).splitlines()
    return text[0] if text and text[0] else type(error).__name__

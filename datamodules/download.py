"""Fetch a file atomically, checking its md5 (the download path is the only place checksums are required)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from datamodules.errors import DataError


def download(url: str, destination: str | os.PathLike, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``: into a temp file beside it, checked, then ``os.replace``-d into place.

    An interrupted or failed download leaves nothing at ``destination``.

    Raises:
        DataError: when the server cannot be reached or answers with an error, or the md5 differs; one line naming
            the URL and where to put the file by hand.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        digest = hashlib.md5()
        try:
            with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    file.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DataError(
                f"cannot download {url} ({reason}); check the network, or put the file at {destination} by hand"
            ) from None
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}; try again, or put the official "
                f"file at {destination} by hand"
            )
        os.replace(temp, destination)
    finally:
        Path(temp).unlink(missing_ok=True)
    return destination


"""Fetch a file atomically, checking its md5 (the download path is the only place checksums are required)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from datamodules.errors import DataError


def download(url: str, destination: str | os.PathLike, md5: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``: into a temp file beside it, checked, then ``os.replace``-d into place.

    An interrupted or failed download (no network, an error status, a connection cut mid-transfer, fewer bytes
    than the server announced, a wrong md5, ``Ctrl-C``) leaves nothing at ``destination`` and no temp file.

    Raises:
        DataError: when the server cannot be reached or answers with an error, the transfer breaks off, or the md5
            differs; one line naming the URL and where to put the file by hand.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
    try:
        digest = hashlib.md5()
        received = 0
        try:
            with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=timeout) as response:
                expected = response.headers.get("Content-Length") if hasattr(response, "headers") else None
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    file.write(chunk)
                    received += len(chunk)
        # OSError covers URLError, timeouts and refused connections; HTTPException a connection cut mid-body
        # (IncompleteRead); ValueError a URL urllib cannot open.
        except (OSError, http.client.HTTPException, ValueError) as error:
            if isinstance(error, urllib.error.HTTPError):
                reason = f"HTTP {error.code} {error.reason}"
            else:
                reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
            raise DataError(
                f"cannot download {url} ({' '.join(str(reason).split())}); check the network, or put the file at "
                f"{destination} by hand"
            ) from None
        if expected is not None and expected.isdigit() and received != int(expected):
            raise DataError(
                f"the download of {url} broke off after {received} of {expected} bytes; try again, or put the file at "
                f"{destination} by hand"
            )
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"{url} downloaded with md5 {digest.hexdigest()}, expected {md5}; try again, or put the official "
                f"file at {destination} by hand"
            )
        os.replace(temp, destination)
    finally:
        Path(temp).unlink(missing_ok=True)
    return destination

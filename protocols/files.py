"""Writing a file so that a crash leaves the old one or the new one, never half of either.

The pool's blobs, personal records, keys and the coordinator's and the device's state files all go through
`write_atomic`: a temp file beside the target (so the rename stays on one file system), created with the final
mode (a key is never readable by others, not even for a moment), synced, then renamed into place. On any failure
the temp file is removed and the target is left as it was. Temp files are named `.<name>.<random>.tmp`, which
is how `bouquet pool verify` recognises the leftovers of a crash.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj, mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode(), mode)

"""Where selprune keeps its cache and finds its bundled data, and how it writes files.

Every output file is written atomically (a temporary file in the same folder, then
`os.replace`), so an interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The cache root: `$SELPRUNE_CACHE`, else `~/.cache/selprune`."""
    root = os.environ.get("SELPRUNE_CACHE") or Path.home() / ".cache" / "selprune"
    return Path(root).expanduser()


def data_dir() -> Path:
    """The bundled corpora: `$SELPRUNE_DATA`, else `data/` beside the package."""
    return Path(os.environ.get("SELPRUNE_DATA") or REPO_ROOT / "data").expanduser()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL on a random name, mode 0666 less the umask: the permissions open() gives a
    # new file (mkstemp's are private, 0600), without reading the umask by changing it
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None and e.errno is not None:  # e.g. a full disk: say which file could not be written
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (diff-friendly, stable)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode())

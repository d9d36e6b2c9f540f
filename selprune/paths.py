"""Where selprune keeps its cache and finds its bundled data, and how it writes files.

Every output file is written atomically (a temporary file in the same folder, then
`os.replace`), so an interrupted run never leaves a half-written result behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from selprune.errors import SelpruneError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file (mkstemp's are private, 0600)


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """Read a JSON file of a run directory; an unreadable one is a `SelpruneError` that
    names it and the fix (never a bare JSONDecodeError)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelpruneError(f"run file {path} is corrupt ({e}); delete the run directory and start again") from e


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as indented, key-sorted JSON (diff-friendly, stable)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode())

"""Files that hold secrets (admin token, producer tokens, Kafka password): read only when private.

A secret file readable or writable by group or others is refused: anyone on the machine who can read it can
act as its holder, and anyone who can write it can replace it. The fix is one command, and the error says it.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path


def check_private(path: Path, what: str) -> None:
    """ValueError when `path` (an existing file) has any group/other permission bit."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{what} file {path} has mode {stat.S_IMODE(mode):04o}: group or others may read or write "
                         f"it; run `chmod 600 {path}` (and check who else saw it)")


def read_secret(path: Path, what: str) -> str:
    """The stripped text of a private secret file (ValueError when missing, empty or not private)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} file {path} does not exist")
    check_private(path, what)
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"{what} file {path} is empty")
    return text


def load_or_create_secret(path: Path, what: str) -> str:
    """The secret in `path`; a new random one is written there (0600) when the file does not exist."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)  # atomic and exclusive: servers starting together agree on one secret
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return read_secret(path, what)

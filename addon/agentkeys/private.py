"""Files only the proxy's own user may read: the key store, the audit log, the CA's folder.

The store holds key hashes and budgets, the audit log who called what, the certs folder the CA's
private key. Each is created with owner-only permissions, whatever the umask: a file's mode is
given when it is created (the umask can only take permissions away), and SQLite creates its
`-wal` and `-shm` files with the permissions of the database file.
"""

import os
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_opener(path: str, flags: int) -> int:
    """An `opener` for `open()` that creates the file owner-only."""
    return os.open(path, flags, FILE_MODE)


def create_private_file(path: Path) -> None:
    """Create `path` empty and owner-only if it does not exist; an existing file is not even opened.

    Not opened, because closing any descriptor of a file drops every POSIX lock this process holds on
    it: a second handle on an open SQLite store (the gate's nonblocking one) would release the first
    one's locks, and its reads would see a stale snapshot.
    """
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    except FileExistsError:
        pass


def private_folder(path: Path) -> None:
    """Create `path` (and its parents) if need be, and make it owner-only."""
    path.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    path.chmod(FOLDER_MODE)

"""Writing a file so that every reader, in any process, sees its old content or its new content whole."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o666,
                     fsync: bool = False) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place.

    `mode` as for open(2) (the umask applies); `fsync` when the content must outlive a crash of the machine,
    not only of the writer. On any failure (disk full included) the temporary file goes and `path` keeps
    what it had."""
    target = Path(path)
    # os.urandom, not secrets: this module is on every mount's path, which keeps its imports few.
    tmp = target.with_name(f".tmp-{target.name}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

"""Checkpoints that are never left truncated, resumable without unpickling code."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from mmengine.fileio import LocalBackend, register_backend

from densedino.weights import allow_checkpoint_globals

# mmengine's resume calls torch.load with torch's default weights_only=True; allow exactly the
# non-tensor objects our checkpoints hold (numpy scalars, mmengine's HistoryBuffer).
allow_checkpoint_globals()


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it (atomic on POSIX):
    a reader (or a resumed run) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@register_backend("atomic_local")
class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic writes (``backend_args=dict(backend=...)``)."""

    def put(self, obj: bytes, filepath: str | Path) -> None:
        atomic_write(filepath, obj)

    def put_text(self, obj: str, filepath: str | Path, encoding: str = "utf-8") -> None:
        atomic_write(filepath, obj.encode(encoding))


def is_complete(path: Path) -> bool:
    """A torch checkpoint (zip format) whose central directory is readable."""
    try:
        with zipfile.ZipFile(path) as zf:
            return len(zf.namelist()) > 0
    except (OSError, zipfile.BadZipFile):
        return False


def find_resume_checkpoint(work_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a work dir: mmengine's ``last_checkpoint`` pointer if
    it names a complete file, else the newest complete ``*.pth`` by modification time."""
    work_dir = Path(work_dir)
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():
        named = Path(pointer.read_text().strip())
        if named.is_file() and is_complete(named):
            return named
    candidates = sorted(work_dir.glob("*.pth"), key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if is_complete(p)), None)

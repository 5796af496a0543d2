"""Small shared helpers: repo paths, atomic writes, the run record, run metadata, name rules."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from omegaconf import OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
CONF_DIR = str(REPO_ROOT / "conf")

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces ``path`` only once it is fully written.

    Streams, so a multi-GB checkpoint never sits in memory twice; a crash mid-write leaves
    the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not on every FS)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: never a half-written file."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path, taken_ok: bool = False) -> Iterator[Path]:
    """A new folder to fill, renamed to ``path`` once the block completes: a folder with the
    final name is always complete, and an error (or interrupt) leaves nothing behind.

    ``taken_ok``: when another process renamed its folder to ``path`` first, keep theirs (a
    cache entry built from the same parameters is the same); otherwise that is an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not (taken_ok and path.is_dir()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def run_record(
    path: str | Path,
    summary: dict[str, Any],
    write: bool = True,
    close: Callable[[dict[str, Any]], None] | None = None,
    stops: Mapping[type[BaseException], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Write ``summary`` to ``path`` (a run's ``metrics.json``) however the block ends, so a
    sweep sees every job. A block that raises is recorded as failed, with the error, or, for
    an exception type in ``stops``, with that status and the exception's message (logged: a
    preemption is no failure). ``write``: False on the ranks that must not write;
    ``close(summary)`` runs last (e.g. finishing a logger's run).
    """
    try:
        yield summary
    except BaseException as error:
        status = next((s for t, s in (stops or {}).items() if isinstance(error, t)), None)
        if status is None:
            summary["status"] = "failed"
            summary["error"] = f"{type(error).__name__}: {error}"
        else:
            summary["status"] = status
            summary["error"] = str(error)
            log.warning("%s", error)
        raise
    finally:
        if write:
            atomic_write_json(path, summary)
        if close is not None:
            close(summary)


def last_match(name: str, rules: Iterable[tuple[str, Any]], default: Any) -> Any:
    """The value of the last ``(regex, value)`` rule whose pattern ``re.search``-es ``name``,
    else ``default``: later rules refine earlier ones (freeze rules, learning-rate factors)."""
    value = default
    for pattern, candidate in rules:
        if re.search(pattern, name):
            value = candidate
    return value


def checkpoint_record(ckpt_path: str | Path, kind: str) -> Path:
    """``<ckpt>.<kind>.json`` beside a checkpoint (file or folder): what later steps learnt
    about it (``threshold``: tuned on val; ``eval``: where its last evaluation is)."""
    path = Path(ckpt_path)
    return path.with_name(f"{path.name}.{kind}.json")


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    """Tensor/number metrics -> plain floats (for JSON)."""
    return {k: float(v) for k, v in metrics.items()}


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (libraries type-check their arguments)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def safe_dirname(text: str, max_bytes: int = 200) -> str:
    """One path-safe directory name for ``text`` (e.g. a job's overrides).

    Path separators become ``_`` (``data.root=/x`` must not nest folders), and a name longer
    than ``max_bytes`` is cut and suffixed with a hash of the whole text, since file systems
    refuse names over 255 bytes and a long override list easily exceeds that.
    """
    name = re.sub(r"[/\\\x00]", "_", text)
    if len(name.encode()) <= max_bytes:
        return name
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    head = name.encode()[: max_bytes - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


# Used by conf/hydra/default.yaml (sweep sub-directories); registered on `import sa2va`.
OmegaConf.register_new_resolver("sa2va_dirname", safe_dirname, replace=True)

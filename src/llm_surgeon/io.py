"""Files and folders that never lose a user's data: atomic writes, exclusive temporaries, fsync,
the marker of our own outputs, and recovery of a replace that a kill interrupted.

* **Exclusive temporaries.** Every temporary file or folder is created by ``mkstemp``/``mkdtemp``
  (``O_EXCL``), named ``.NAME.tmp-PID-XXXX`` beside its target: a planted symlink is never
  followed, and the PID tells a later run whether its writer is still alive.
* **Durability.** A file's data and its folder entry are fsynced before it takes its final name,
  and the parent folder after, so a finished run also survives a power loss.
* **Our outputs.** A folder this tool writes holds :data:`MARKER`, a small JSON listing the
  files it wrote. Only such a folder, holding nothing else (sub-folders with their own marker
  count as ours), may be replaced; a folder with foreign files is refused, never deleted.
* **No window.** A folder is replaced by one atomic exchange of the new and the old folder
  (``renameat2(RENAME_EXCHANGE)`` on Linux): the name always holds one complete version. Where
  the exchange is unavailable, two renames (``NAME`` → ``.NAME.old-PID``, temporary → ``NAME``)
  are used, and :func:`recover` finishes (or rolls back) a replace that a kill interrupted the
  next time the folder is used; it also removes stale temporaries of dead processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_surgeon.errors import UserError

MARKER = ".llm-surgeon-output"
TOOL = "llm-surgeon"
MARKER_VERSION = 1
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


# ---- renames (with the test hook) ----------------------------------------------------------

_renames = 0


def _before_rename() -> None:
    """Tests set ``LLM_SURGEON_KILL_AT_RENAME=K`` to SIGKILL the process just before the K-th
    rename (or exchange) this module makes: every crash window, one at a time
    (``LLM_SURGEON_KILL_SIGNAL=TERM`` sends SIGTERM instead)."""
    global _renames
    _renames += 1
    if os.environ.get("LLM_SURGEON_KILL_AT_RENAME") == str(_renames):
        sig = os.environ.get("LLM_SURGEON_KILL_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))


def rename(src: str | Path, dst: str | Path) -> None:
    _before_rename()
    os.replace(src, dst)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def exchange(a: str | Path, b: str | Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or file system does not offer it (nothing happened then)."""
    global _renameat2
    if os.environ.get("LLM_SURGEON_NO_EXCHANGE") == "1":
        return False
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    _before_rename()
    if _renameat2(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)),
                  _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


# ---- fsync ---------------------------------------------------------------------------------


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename, a new file) durable; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under ``folder``, the folder itself last."""
    for root, dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                fsync_file(p)
        for d in dirs:
            fsync_dir(os.path.join(root, d))
    fsync_dir(folder)


# ---- exclusive temporaries and atomic files ------------------------------------------------


def temp_prefix(name: str) -> str:
    return f".{name}.tmp-{os.getpid()}-"


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through an exclusively created temporary beside it (fsynced,
    renamed, folder fsynced): ``path`` holds the old or the new content, never a part."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; name a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield an exclusively created temporary path beside ``path`` for a library to write
    (``torch.save``, ``savefig``); on success it is fsynced and takes ``path``'s name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- the marker of our outputs -------------------------------------------------------------


def _listing(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` (relative, folders with a trailing /), except
    the marker itself."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [f"{(rel / d).as_posix()}/" for d in dirs]
        out += [(rel / f).as_posix() for f in files if not (rel == Path(".") and f == MARKER)]
    return sorted(out)


def write_marker(folder: str | Path, kind: str = "output") -> None:
    """Record in ``folder`` that this tool wrote it, and which files it wrote."""
    from llm_surgeon import __version__

    folder = Path(folder)
    payload = {"tool": TOOL, "version": __version__, "marker_version": MARKER_VERSION,
               "kind": kind, "files": _listing(folder)}
    atomic_write(folder / MARKER, json.dumps(payload, indent=1) + "\n")


def add_to_marker(folder: str | Path, paths: list[Path]) -> None:
    """Record more files (e.g. the ``report`` command's summary and plots) as ours, if
    ``folder`` is one of our outputs."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return
    files = set(marker["files"])
    for p in paths:
        rel = Path(p).resolve().relative_to(folder.resolve())
        files.add(rel.as_posix())
        for parent in list(rel.parents)[:-1]:
            files.add(f"{parent.as_posix()}/")
    marker["files"] = sorted(files)
    atomic_write(folder / MARKER, json.dumps(marker, indent=1) + "\n")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MARKER
    if not path.is_file() or path.is_symlink():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("tool") != TOOL
            or not isinstance(marker.get("files"), list)
            or not all(isinstance(f, str) for f in marker["files"])):
        return None
    return marker


def foreign_files(folder: str | Path) -> list[str] | None:
    """What in ``folder`` this tool did not write (``None``: no valid marker at all). A
    sub-folder with its own marker is checked against that; stale leftovers of our own
    interrupted writes count as ours."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return None
    listed = set(marker["files"])
    foreign: list[str] = []

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(d.iterdir()):
            name = f"{rel}{entry.name}"
            if rel == "" and entry.name == MARKER:
                continue
            if _stale_leftover(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                if read_marker(entry) is not None:
                    foreign.extend(f"{name}/{f}" for f in foreign_files(entry) or [])
                elif f"{name}/" in listed:
                    walk(entry, f"{name}/")
                else:
                    foreign.append(f"{name}/")
            elif name not in listed:
                foreign.append(name)

    walk(folder, "")
    return foreign


def is_ours(folder: str | Path) -> bool:
    return foreign_files(folder) == []


# ---- replacing a folder --------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier process with our number: we start clean
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_leftover(name: str) -> bool:
    m = _LEFTOVER.match(name)
    return bool(m) and not _pid_alive(int(m.group("pid")))


def recover(target: str | Path) -> None:
    """Finish or roll back a replace of ``target`` that a kill interrupted, and remove stale
    temporaries of ``target`` left by dead processes (never anything else).

    * ``target`` missing, ``.NAME.old-PID`` present: the kill fell between the two renames;
      a complete new version (``.NAME.tmp-PID-*`` holding its marker) takes the name, else
      the old one returns.
    * ``target`` missing, a complete temporary present: the first save was killed just before
      its rename; it takes the name.
    * Everything else of a dead writer is removed.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    mine: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in parent.iterdir():
        m = _LEFTOVER.match(entry.name)
        if (m and m.group("name") == target.name and not _pid_alive(int(m.group("pid")))):
            mine[m.group("kind")].append(entry)
    if not mine["tmp"] and not mine["old"]:
        return
    if not target.exists() and not target.is_symlink():
        complete = [p for p in mine["tmp"] if p.is_dir() and read_marker(p) is not None]
        complete.sort(key=lambda p: p.stat().st_mtime)
        olds = [p for p in mine["old"] if p.is_dir()]
        if complete:  # finish: the newest complete version
            winner = complete[-1]
        elif olds:  # roll back
            winner = olds[-1]
        else:
            winner = None
        if winner is not None:
            fsync_tree(winner)
            rename(winner, target)
            fsync_dir(parent)
    for kind in ("tmp", "old"):
        for p in mine[kind]:
            if p.exists() or p.is_symlink():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        p.unlink()


def check_replaceable(target: str | Path, what: str) -> None:
    """Refuse to replace ``target`` unless it is missing, empty, or one of our outputs
    holding nothing but our files."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{what} {target} exists and is not a folder; choose a new folder")
    if not target.exists() or all(_stale_leftover(p.name) for p in target.iterdir()):
        return
    foreign = foreign_files(target)
    if foreign is None:
        raise UserError(
            f"{what} {target} exists and is not an llm-surgeon output (no {MARKER} marker; "
            "outputs of llm-surgeon 0.1.0 and older have none); choose a new folder, or move its "
            "contents away yourself")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise UserError(f"{what} {target} holds files llm-surgeon did not write ({shown}); "
                        "move them away or choose a new folder")


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``target`` (which may exist), so that
    ``target`` always names one complete version: one atomic exchange, else two renames that
    :func:`recover` completes after a kill."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    if target.exists():
        if exchange(tmp, target):
            fsync_dir(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old version
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        rename(target, old)
        rename(tmp, target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        rename(tmp, target)
        fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_folder(target: str | Path, kind: str = "output") -> Iterator[Path]:
    """Yield an exclusively created temporary sibling folder to fill; on success it gets our
    marker, is fsynced and takes ``target``'s name (an existing ``target`` must be ours and is
    replaced whole); on any error it is removed: ``target`` never appears half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    check_replaceable(target, "output folder")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is ordinary
    try:
        yield tmp
        write_marker(tmp, kind)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_output_folder(folder: str | Path) -> None:
    """Create ``folder`` as one of our outputs (with an empty marker) if it does not exist."""
    folder = Path(folder)
    if folder.exists():
        if read_marker(folder) is None and not any(folder.iterdir()):
            write_marker(folder)
        return
    with atomic_folder(folder):  # a kill leaves no unmarked folder behind
        pass


# ---- private work folders (offload) --------------------------------------------------------


def work_folder(root: str | Path, prefix: str = "run") -> Path:
    """A fresh private folder ``root/PREFIX-PID-XXXX``; stale ones of dead processes (a killed
    ``--max-memory`` run leaves a copy of the decoder layers there) are removed first."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-")
    for entry in root.iterdir():
        m = pattern.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=root))


# ---- checking a path before any work ------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: Path, what: str, path: Path) -> None:
    """Create (and remove) an exclusive temporary file in ``folder``: the only reliable test
    (``os.access`` says yes to root on a read-only file system)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix("probe"), dir=folder)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {folder} ({exc.strerror})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_folder(path: str | Path, what: str = "--output") -> None:
    """Refuse, before any work, an output folder that cannot be written or replaced: the
    current folder or one above it, a file, a folder not writable, one with foreign files."""
    raw = str(path)
    path = Path(path).expanduser()
    try:
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
    except OSError as exc:
        raise UserError(f"{what} {raw}: {exc.strerror}") from None
    if resolved == cwd or resolved in cwd.parents or resolved == resolved.parent:
        raise UserError(f"{what} {raw} is the current folder or one above it; name a new "
                        "folder such as ./out")
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise UserError(f"{what} {raw} exists and is not a folder; choose a new folder")
        probe_writable(path, what, Path(raw))
    anchor = _nearest_existing(resolved.parent)
    if not anchor.is_dir():
        raise UserError(f"{what} {raw}: {anchor} is not a folder")
    probe_writable(anchor, what, Path(raw))


def check_output_file(path: str | Path, what: str) -> None:
    """Refuse, before any work, a file path that cannot be written: a folder, a parent that is
    a file, a place not writable."""
    raw = str(path)
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} {raw} is a folder; name a file")
    anchor = _nearest_existing(path.resolve().parent)
    if not anchor.is_dir():
        raise UserError(f"{what} {raw}: {anchor} is not a folder")
    probe_writable(anchor, what, Path(raw))

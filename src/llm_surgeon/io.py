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
  SIGINT/SIGTERM are held back while a replace runs.
* **Strict ownership.** A leftover is ours only if it carries our marker (a temporary folder
  gets one the moment it is created; a temporary file counts only inside one of our folders,
  for a name that folder's marker lists), the marker names this host, and no live process
  holds its lock (``flock``: a held lock means its writer is alive, in any PID namespace).
  Names alone never make anything ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_surgeon.errors import UserError

MARKER = ".llm-surgeon-output"
TOOL = "llm-surgeon"
MARKER_VERSION = 1
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")
WORK = ".llm-surgeon-work"  # the folder of private work folders inside an --offload-dir
LOCK = "lock"


# ---- who we are, and locks that say a writer is alive ----------------------------------


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner() -> dict[str, Any]:
    """What a marker records of its writer: host, PID, the process's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_time": _start_time(os.getpid())}


def _lock_shared(fd: int) -> None:
    """Hold a shared lock on ``fd`` for as long as it stays open (a live writer); a file system
    without locks gets none (its leftovers then look alive only by their host check)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _unlocked(path: Path) -> bool:
    """True only if nobody holds a lock on ``path`` (we could take it exclusively); any doubt
    (no such file, no locks on this file system) says False: a live writer's files stay."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (releases the lock)


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
    _lock_shared(fd)  # (a live writer's temporary: closed, hence released, after the rename)
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
    _lock_shared(fd)  # held while the library writes through its own descriptor
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
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


def _marker_payload(kind: str, files: list[str], writing: bool = False) -> dict[str, Any]:
    from llm_surgeon import __version__

    payload = {"tool": TOOL, "version": __version__, "marker_version": MARKER_VERSION,
               "kind": kind, "files": files, **owner()}
    if writing:
        payload["writing"] = True
    return payload


def write_marker(folder: str | Path, kind: str = "output") -> None:
    """Record in ``folder`` that this tool wrote it, and which files it wrote."""
    folder = Path(folder)
    payload = _marker_payload(kind, _listing(folder))
    atomic_write(folder / MARKER, json.dumps(payload, indent=1) + "\n")


def _write_first_marker(folder: Path, kind: str) -> None:
    """The marker of a temporary folder we just created (private, empty): written in place,
    exclusively, before anything else, and saying the folder is still being written."""
    payload = json.dumps(_marker_payload(kind, [], writing=True), indent=1) + "\n"
    fd = os.open(folder / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "w") as fh:
        fh.write(payload)


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


def read_marker(folder: str | Path, kind: str | None = None) -> dict[str, Any] | None:
    """Our marker in ``folder`` (``None``: none, not ours, or, with ``kind``, of another
    kind: an output is not a checkpoint, nor the bundled model's cache)."""
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
    if kind is not None and marker.get("kind", "output") != kind:
        return None
    return marker


def _our_leftover(entry: Path, kind: str | None = None,
                  listed: set[str] | None = None) -> bool:
    """Is ``entry`` a leftover of a dead writer of ours? A folder: it carries our marker (of
    ``kind``), written on this host, and no live process holds it. A file: only inside one of
    our folders (``listed``: its marker's names), a temporary of a name listed there, not held.
    Its name alone never decides."""
    m = _LEFTOVER.match(entry.name)
    if not m or entry.is_symlink():
        return False
    if entry.is_dir():
        marker = read_marker(entry, kind)
        return (marker is not None and marker.get("host", socket.gethostname())
                == socket.gethostname() and _unlocked(entry))
    if not entry.is_file() or listed is None or m.group("kind") != "tmp":
        return False
    return (m.group("name") == MARKER or m.group("name") in listed) and _unlocked(entry)


def _complete(folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and not marker.get("writing")


def foreign_files(folder: str | Path, kind: str | None = None) -> list[str] | None:
    """What in ``folder`` this tool did not write (``None``: no valid marker at all, or one of
    another ``kind``). Only ``checkpoint/`` with a checkpoint marker counts as a sub-folder of
    ours; leftovers count as ours only if :func:`_our_leftover` says so."""
    folder = Path(folder)
    marker = read_marker(folder, kind)
    if marker is None:
        return None
    listed = set(marker["files"])
    foreign: list[str] = []

    def walk(d: Path, rel: str) -> None:
        here = {f[len(rel):].rstrip("/") for f in listed if f.startswith(rel)}
        here = {n for n in here if n and "/" not in n} | {MARKER}
        for entry in sorted(d.iterdir()):
            name = f"{rel}{entry.name}"
            if rel == "" and entry.name == MARKER:
                continue
            m = _LEFTOVER.match(entry.name)
            top_dir = rel == "" and entry.is_dir() and not entry.is_symlink()
            if m and top_dir and m.group("name") == "checkpoint":
                if _our_leftover(entry, "checkpoint"):
                    continue
            elif m and not entry.is_dir() and _our_leftover(entry, listed=here):
                continue
            if top_dir and entry.name == "checkpoint" and \
                    read_marker(entry, "checkpoint") is not None:
                foreign.extend(f"{name}/{f}" for f in foreign_files(entry, "checkpoint") or [])
            elif entry.is_dir() and not entry.is_symlink():
                if f"{name}/" in listed:
                    walk(entry, f"{name}/")
                else:
                    foreign.append(f"{name}/")
            elif name not in listed:
                foreign.append(name)

    walk(folder, "")
    return foreign


def is_ours(folder: str | Path, kind: str | None = None) -> bool:
    return foreign_files(folder, kind) == []


# ---- replacing a folder --------------------------------------------------------------------


def recover(target: str | Path, kind: str | None = None) -> None:
    """Finish or roll back a replace of ``target`` that a kill interrupted, and remove stale
    temporaries of ``target`` left by dead writers (never anything else: only folders named
    ``.NAME.tmp-*``/``.NAME.old-*`` that carry our marker of ``kind``, from this host, whose
    lock nobody holds).

    * ``target`` missing, ``.NAME.old-PID`` present: the kill fell between the two renames;
      a complete new version (``.NAME.tmp-PID-*`` with a finished marker) takes the name, else
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
        if m and m.group("name") == target.name and _our_leftover(entry, kind):
            mine[m.group("kind")].append(entry)
    if not mine["tmp"] and not mine["old"]:
        return
    if not target.exists() and not target.is_symlink():
        complete = [p for p in mine["tmp"] if _complete(p)]
        complete.sort(key=lambda p: p.stat().st_mtime)
        olds = [p for p in mine["old"] if _complete(p)]
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
            mine["tmp" if winner in mine["tmp"] else "old"].remove(winner)
    for kind_ in ("tmp", "old"):
        for p in mine[kind_]:
            shutil.rmtree(p, ignore_errors=True)


def check_replaceable(target: str | Path, what: str, kind: str = "output") -> None:
    """Refuse to replace ``target`` unless it is missing, empty, or one of our outputs (of
    ``kind``) holding nothing but our files."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(f"{what} {target} exists and is not a folder; choose a new folder")
    if not target.exists() or not any(target.iterdir()):
        return
    foreign = foreign_files(target, kind)
    if foreign is None:
        other = read_marker(target)
        if other is not None:
            raise UserError(f"{what} {target} is an llm-surgeon {other.get('kind')} folder, not "
                            f"an {kind} folder; choose a new folder")
        raise UserError(
            f"{what} {target} exists and is not an llm-surgeon output (no {MARKER} marker; "
            "outputs of llm-surgeon 0.1.0 and older have none); choose a new folder, or move its "
            "contents away yourself")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise UserError(f"{what} {target} holds files llm-surgeon did not write ({shown}); "
                        "move them away or choose a new folder")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM (delivered when the block ends): a replace, once begun,
    always ends with one complete version under the name."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):  # no such call here
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _held_dir(path: Path) -> int | None:
    """Open and lock (shared) a folder for the time a replace moves it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    _lock_shared(fd)
    return fd


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``target`` (which may exist), so that
    ``target`` always names one complete version: one atomic exchange, else two renames that
    :func:`recover` completes after a kill. SIGINT/SIGTERM wait until it is done."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    with signals_held():
        if target.exists():
            if exchange(tmp, target):
                fsync_dir(target.parent)
                shutil.rmtree(tmp, ignore_errors=True)  # now the old version
                return
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            fd = _held_dir(target)  # the old version, locked while it is moved aside
            try:
                rename(target, old)
                rename(tmp, target)
                fsync_dir(target.parent)
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(old, ignore_errors=True)
        else:
            rename(tmp, target)
            fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_folder(target: str | Path, kind: str = "output") -> Iterator[Path]:
    """Yield an exclusively created temporary sibling folder to fill (marked as ours, being
    written, and locked, from its first moment); on success it gets our final marker, is
    fsynced and takes ``target``'s name (an existing ``target`` must be ours, of ``kind``, and
    is replaced whole); on any error it is removed: ``target`` never appears half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target, "output folder", kind)  # ownership first, then recovery
    recover(target, kind)
    check_replaceable(target, "output folder", kind)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    fd = _held_dir(tmp)  # alive while we hold it: another process leaves it alone
    try:
        _write_first_marker(tmp, kind)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is ordinary
        yield tmp
        write_marker(tmp, kind)
        replace_dir(tmp, target)
    except BaseException:
        keep = False
        if tmp.is_dir() and not target.exists() and _complete(tmp):
            try:  # the complete new result and no other: it takes the name, never deleted
                rename(tmp, target)
                fsync_dir(target.parent)
            except OSError:
                keep = True  # (marked, complete: recover() puts it in place on the next start)
        if tmp.is_dir() and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def save_atomically(
    model: Any, tokenizer: Any, target: str | Path, extra_files: dict[str, str] | None = None
) -> None:
    """Save a model (safetensors) and tokenizer to ``target`` through a temporary sibling folder.

    The folder appears under its final name only once it is complete; an existing ``target`` is
    replaced.
    """
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_extras(tmp, tokenizer, extra_files)


def write_extras(folder: Path, tokenizer: Any, extra_files: dict[str, str] | None) -> None:
    """The tokenizer and extra text files (e.g. report.json) next to the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def ensure_output_folder(folder: str | Path, kind: str = "output") -> None:
    """Create ``folder`` as one of our outputs (with an empty marker) if it does not exist."""
    folder = Path(folder)
    if folder.exists():
        if read_marker(folder) is None and not any(folder.iterdir()):
            write_marker(folder, kind)
        return
    with atomic_folder(folder, kind):  # a kill leaves no unmarked folder behind
        pass


# ---- private work folders (offload) --------------------------------------------------------

_work_locks: dict[Path, int] = {}


def work_folder(root: str | Path, prefix: str = "run") -> Path:
    """A fresh private folder ``root/.llm-surgeon-work/PREFIX-PID-XXXX`` marked as ours (host,
    PID, start time) and holding a lock for the run's lifetime (release it with
    :func:`remove_work_folder`). Stale ones (a killed ``--max-memory`` run leaves a copy of the
    decoder layers there) are removed first: only folders under ``.llm-surgeon-work`` that carry
    our work marker from this host and whose lock nobody holds; nothing else in ``root``."""
    base = Path(root) / WORK
    for _ in range(5):
        base.mkdir(parents=True, exist_ok=True)
        for entry in base.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                marker = read_marker(entry, "work")
                if (marker is not None and marker.get("host") == socket.gethostname()
                        and _unlocked(entry / LOCK)):
                    shutil.rmtree(entry, ignore_errors=True)
        try:
            work = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))
            break
        except FileNotFoundError:  # another run removed the empty base meanwhile
            continue
    else:
        raise UserError(f"--offload-dir {root}: cannot create a work folder in {base}")
    fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    _lock_shared(fd)
    _work_locks[work] = fd
    _write_first_marker(work, "work")
    return work


def remove_work_folder(work: str | Path) -> None:
    """Remove a work folder of this run, release its lock, and the owned parent if empty."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    fd = _work_locks.pop(work, None)
    if fd is not None:
        os.close(fd)
    with contextlib.suppress(OSError):
        work.parent.rmdir()  # only if empty (another run's folder keeps it)


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


def check_creatable(path: str | Path, what: str, folder: bool = True) -> Path:
    """Refuse, before any work, a path that cannot be created or written: for a folder one
    that exists as a file (or a symlink), for a file one that exists as a folder; then the
    nearest existing folder above it must be a folder we can write in (probed). Returns the
    path, ``~`` expanded."""
    raw = str(path)
    path = Path(path).expanduser()
    if folder and (path.is_symlink() or (path.exists() and not path.is_dir())):
        raise UserError(f"{what} {raw} exists and is not a folder; choose a new folder")
    if not folder and path.is_dir():
        raise UserError(f"{what} {raw} is a folder; name a file")
    if folder and path.is_dir():
        probe_writable(path, what, Path(raw))
    anchor = _nearest_existing(path.resolve().parent)
    if not anchor.is_dir():
        raise UserError(f"{what} {raw}: {anchor} is not a folder")
    probe_writable(anchor, what, Path(raw))
    return path


def check_output_path_usable(path: str | Path, what: str = "--output") -> None:
    """Refuse, before any work, an output folder path that can never be written: the current
    folder or one above it, a file, a folder not writable. (Whether an existing folder may be
    *replaced* is :func:`check_replaceable`'s question.)"""
    raw = str(path)
    try:
        resolved = Path(path).expanduser().resolve()
        cwd = Path.cwd().resolve()
    except OSError as exc:
        raise UserError(f"{what} {raw}: {exc.strerror}") from None
    if resolved == cwd or resolved in cwd.parents or resolved == resolved.parent:
        raise UserError(f"{what} {raw} is the current folder or one above it; name a new "
                        "folder such as ./out")
    check_creatable(path, what)


def check_output_file(path: str | Path, what: str) -> None:
    """Refuse, before any work, a file path that cannot be written: a folder, a parent that is
    a file, a place not writable."""
    check_creatable(path, what, folder=False)


def check_bench_folder(path: str | Path) -> None:
    """A bench ``--output``: a usable path (:func:`check_output_path_usable`) that is new,
    empty, or a bench folder we wrote (its marker says so): a user's folder is never written
    into."""
    check_output_path_usable(path)
    path = Path(path).expanduser()
    if path.is_dir() and any(path.iterdir()) and read_marker(path, "bench") is None:
        raise UserError(f"--output {path} is not empty and is not an llm-surgeon bench folder "
                        f"(no {MARKER} marker of kind bench); choose a new folder")

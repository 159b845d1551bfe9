"""What jaxpeft writes, and how it keeps what was there: one writer per run folder, a manifest of the entries jaxpeft
wrote in a folder (so an overwrite removes those and nothing else), outputs kept apart from inputs, and files that
appear whole (written aside, then renamed into place) with the permissions the umask gives.

- ``writer_lock(folder)`` is held by whatever trains into a folder (``Trainer.train``, ``jaxpeft train``): an OS
  lock on ``folder/.jaxpeft.lock`` (a second writer gets a one-line ``OutputError`` naming the holder's pid; the
  lock goes with the process, even when it is killed). Under it, ``check_run`` refuses a fresh run into a folder
  that holds an earlier run's outputs, and ``start_run`` starts one. Readers (``jaxpeft eval``, ``export``,
  ``merge``) take no lock and change nothing.
- ``folder/.jaxpeft-manifest.json`` lists the entries jaxpeft wrote there (``record``); ``remove_written`` deletes
  exactly those.
- ``check_apart(output, inputs)`` refuses an output that is, holds or lies inside one of the inputs.
- ``write_folder(output, write, overwrite=)`` makes a folder whole, as the merge and export commands write them.

Example:
    >>> import pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with writer_lock(run):
    ...     start_run(run, resume=False, overwrite=False)
    ...     write_json(run / "result.json", {"loss": float("nan")})  # strict JSON: NaN is written as null
    ...     record(run, "result.json")
    >>> (run / "result.json").read_text()
    '{\\n  "loss": null\\n}\\n'
    >>> with writer_lock(run):
    ...     check_run(run, resume=False, overwrite=False)
    Traceback (most recent call last):
    ...
    jaxpeft.outputs.OutputError: ... holds the outputs of an earlier run (result.json); pass ...
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

LOCK_NAME = ".jaxpeft.lock"
MANIFEST_NAME = ".jaxpeft-manifest.json"
RUN_SIGNS = ("jaxpeft_run.json", "checkpoints")  # outputs of a run that may predate manifests

_held: dict[str, list] = {}  # real path of a locked folder -> [file descriptor, depth], this process's locks
_held_guard = threading.Lock()


class OutputError(ValueError):
    """An output would replace, mix with or lie inside something it must not; the message says what to change."""


# ------------------------------------------------------------------------------------------- files whole


def umask() -> int:
    """The process's umask (read without changing it for longer than the read)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, *, folder: bool) -> None:
    """Gives ``path`` the permissions a plain ``open``/``mkdir`` would have (``tempfile`` makes them private)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by ``None``, so that it is strict JSON.

    Example:
        >>> json_safe({"loss": float("nan"), "steps": [1, float("inf")], "name": "x"})
        {'loss': None, 'steps': [1, None], 'name': 'x'}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_line(record: Mapping) -> str:
    """One strict-JSON line (``NaN`` and infinities as ``null``).

    Example:
        >>> json_line({"step": 3, "loss": float("nan")})
        '{"step": 3, "loss": null}'
    """
    return json.dumps(json_safe(record), allow_nan=False)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` whole: into a temporary file beside it, then renamed over it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        follow_umask(temporary, folder=False)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_json(path: str | os.PathLike, content: Any) -> None:
    """Writes ``content`` as indented strict JSON (non-finite floats as ``null``), whole."""
    write_text(path, json.dumps(json_safe(content), indent=2, sort_keys=True, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------- the manifest


def _manifest(folder: pathlib.Path) -> dict:
    path = folder / MANIFEST_NAME
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise OutputError(f"{path} cannot be read ({type(error).__name__}); it lists what jaxpeft wrote in "
                          f"{folder}: delete the outputs you no longer need and that file") from None
    return content if isinstance(content, dict) else {}


def written(folder: str | os.PathLike) -> list[str]:
    """The entries of ``folder`` that jaxpeft wrote (its manifest's list) and that still exist.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "metrics.jsonl").write_text("{}\\n")
        >>> record(folder, "metrics.jsonl", "adapter")
        >>> written(folder)
        ['metrics.jsonl']
    """
    folder = pathlib.Path(folder)
    names = _manifest(folder).get("written", [])
    return sorted(name for name in names if _is_entry_name(name) and os.path.lexists(folder / name))


def _is_entry_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..", LOCK_NAME, MANIFEST_NAME) and "/" not in name \
        and "\\" not in name and "\0" not in name


def record(folder: str | os.PathLike, *names: str, run: Mapping | None = None) -> None:
    """Adds ``names`` (entries directly in ``folder``) to the manifest of what jaxpeft wrote there; ``run`` marks the
    folder as holding a training run."""
    folder = pathlib.Path(folder)
    content = _manifest(folder)
    listed = set(content.get("written", [])) | {name for name in names if _is_entry_name(name)}
    content = {**content, "format": 1, "written": sorted(listed)}
    if run is not None:
        content["run"] = dict(run)
    write_json(folder / MANIFEST_NAME, content)


def earlier_run(folder: str | os.PathLike) -> list[str]:
    """The outputs of a training run already in ``folder`` (empty when there is none): what the manifest lists for
    a run, or the run files of a run that predates manifests."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    if _manifest(folder).get("run") is not None:
        return written(folder) or [MANIFEST_NAME]
    return [name for name in RUN_SIGNS if (folder / name).exists() and (not (folder / name).is_dir() or any(
        (folder / name).iterdir()))]


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def remove_written(folder: str | os.PathLike) -> list[str]:
    """Deletes what jaxpeft wrote in ``folder`` (its manifest's entries) and nothing else; returns their names.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> for name in ("metrics.jsonl", "notes.txt"):
        ...     _ = (folder / name).write_text("x")
        >>> record(folder, "metrics.jsonl")
        >>> remove_written(folder), sorted(path.name for path in folder.iterdir())
        (['metrics.jsonl'], ['notes.txt'])
    """
    folder = pathlib.Path(folder)
    names = written(folder)
    for name in names:
        _remove(folder / name)
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST_NAME).unlink()
    return names


# -------------------------------------------------------------------------------------------- the lock


def _holder(lock_path: pathlib.Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a process that did not say its pid"


def _acquire(folder: pathlib.Path) -> int:
    """Takes the folder's lock for this process; returns the lock file's descriptor."""
    lock_path = folder / LOCK_NAME
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise
        raise OutputError(f"{folder} is being written by another jaxpeft process ({_holder(lock_path)}); wait for "
                          "it to finish, or choose another output folder") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    return descriptor


@contextlib.contextmanager
def writer_lock(folder: str | os.PathLike) -> Iterator[bool]:
    """Holds ``folder``'s lock (creating the folder); yields whether this is the outermost hold in this process
    (the lock is re-entrant within one process). Another process holding it is a one-line ``OutputError``. A folder
    this call created is removed again if nothing but the lock was written into it."""
    folder = pathlib.Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
        else:
            descriptor = _acquire(folder) if fcntl is not None else -1
            entry = _held[key] = [descriptor, 1]
    try:
        yield entry[1] == 1
    finally:
        with _held_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                if created and {path.name for path in folder.iterdir()} <= {LOCK_NAME}:
                    shutil.rmtree(folder, ignore_errors=True)
                if entry[0] >= 0:
                    os.close(entry[0])  # closing the descriptor releases the lock


def check_run(folder: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Refuses a fresh run into ``folder`` when it holds an earlier run's outputs, unless ``overwrite``; changes
    nothing. Call with the folder's lock held."""
    earlier = earlier_run(folder)
    if earlier and not (resume or overwrite):
        raise OutputError(f"{folder} holds the outputs of an earlier run ({', '.join(earlier)}); pass "
                          "resume_from_checkpoint=True to go on with it, overwrite_output_dir=True to replace them "
                          "(only what jaxpeft wrote there is removed), or choose another output_dir")


def start_run(folder: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """Starts a run in ``folder``, just before its first write: ``check_run``; for a fresh run with ``overwrite``,
    removes what jaxpeft wrote there (nothing else); then marks the folder as holding a run in its manifest. Call
    with the folder's lock held."""
    folder = pathlib.Path(folder)
    check_run(folder, resume=resume, overwrite=overwrite)
    if not resume and overwrite and earlier_run(folder):
        remove_written(folder)
        unlisted = earlier_run(folder)
        if unlisted:
            raise OutputError(f"{folder} holds run outputs that its manifest does not list ({', '.join(unlisted)}), "
                              "so overwrite leaves them; move them away, or choose another folder")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record(folder, run={"pid": os.getpid(), "started": started})


# ------------------------------------------------------------------------------------- inputs and outputs


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_apart(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *,
                output_flag: str = "--output") -> None:
    """Refuses an ``output`` that is, holds or lies inside one of ``inputs`` (by flag; inputs that are not on disk,
    such as hub ids, and ``None`` are skipped).

    Example:
        >>> import os, tempfile
        >>> run = tempfile.mkdtemp()
        >>> check_apart(os.path.join(run, "merged"), {"--run": run})
        Traceback (most recent call last):
        ...
        jaxpeft.outputs.OutputError: --output '.../merged' lies inside --run '...'; choose an output folder ...
    """
    target = os.path.realpath(output)
    for flag, source in inputs.items():
        if source is None or not os.path.lexists(source):
            continue  # a hub id, or nothing on disk to harm
        origin = os.path.realpath(source)
        relation = ("is" if target == origin else "lies inside" if _inside(target, origin)
                    else "holds" if _inside(origin, target) else None)
        if relation is not None:
            raise OutputError(f"{output_flag} {os.fspath(output)!r} {relation} {flag} {os.fspath(source)!r}; choose an "
                              "output folder apart from the inputs")


def _staging_folder(output: pathlib.Path) -> pathlib.Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    follow_umask(staging, folder=True)
    return staging


def _replace_written(output: pathlib.Path, staging: pathlib.Path) -> None:
    """Moves the staged entries into ``output`` in place of what jaxpeft wrote there before; refuses (before any
    change) when a staged name would replace something jaxpeft did not write."""
    before = set(written(output))
    clashes = sorted(path.name for path in staging.iterdir()
                     if path.name != MANIFEST_NAME and path.name not in before and os.path.lexists(output / path.name))
    if clashes:
        raise OutputError(f"{output} holds {', '.join(clashes)}, which jaxpeft did not write; --overwrite replaces "
                          "only jaxpeft's files: move them away, or choose another folder")
    for name in before:
        _remove(output / name)
    names = []
    for path in staging.iterdir():
        if path.name != MANIFEST_NAME:
            os.replace(path, output / path.name)
            names.append(path.name)
    with contextlib.suppress(FileNotFoundError):
        (output / MANIFEST_NAME).unlink()
    record(output, *names)


def check_output_folder(output: str | os.PathLike, *, overwrite: bool, output_flag: str = "--output") -> bool:
    """Refuses an ``output`` folder that is a file, or that holds anything unless ``overwrite``; returns whether it
    holds anything.

    Example:
        >>> import tempfile
        >>> check_output_folder(tempfile.mkdtemp(), overwrite=False)
        False
    """
    path = pathlib.Path(output)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{output_flag} {os.fspath(output)!r} is a file; pass a folder")
    occupied = path.is_dir() and any(path.iterdir())
    if occupied and not overwrite:
        raise OutputError(f"{output_flag} {os.fspath(output)!r} already exists and is not empty; choose a new folder "
                          "or pass --overwrite (it replaces only what jaxpeft wrote there)")
    return occupied


def write_folder(output: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool = False,
                 output_flag: str = "--output") -> None:
    """Runs ``write(folder)`` on a temporary folder beside ``output``, then puts the result in place: the whole
    folder when ``output`` is new or empty; with ``overwrite``, in place of what jaxpeft wrote there before (other
    files stay). A failing ``write`` leaves ``output`` as it was.

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "merged"
        >>> write_folder(out, lambda folder: pathlib.Path(folder, "config.json").write_text("{}"))
        >>> sorted(path.name for path in out.iterdir())
        ['.jaxpeft-manifest.json', 'config.json']
    """
    occupied = check_output_folder(output, overwrite=overwrite, output_flag=output_flag)
    output = pathlib.Path(os.path.abspath(output))
    staging = _staging_folder(output)
    try:
        write(os.fspath(staging))
        for path in staging.rglob("*"):  # libraries write some files private (safetensors, tempfile)
            follow_umask(path, folder=path.is_dir())
        record(staging, *(path.name for path in staging.iterdir()))
        if occupied:
            _replace_written(output, staging)
        else:
            with contextlib.suppress(FileNotFoundError):
                output.rmdir()
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""File operations that a second local user cannot turn against a (root) winclip job.

Someone who can write into the output folder, the cache or the input folder can put a symbolic link,
a FIFO or another file at any name, at any moment. Checking a name and then using it leaves a window
between the two, so nothing here uses a name twice:

* Writing (:func:`atomic_write`): the folders below a trusted root (the output folder, the cache, the
  folder the user named) are opened one at a time relative to the previous one with ``O_NOFOLLOW``
  (missing ones are created the same way); the temporary file gets an unpredictable name and is created
  with ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, written through its descriptor, given its final mode
  with ``fchmod``, synced, and renamed relative to the opened folder. A link planted anywhere, at any time,
  is never followed: at worst the rename replaces the link itself.
* Reading (:func:`open_regular`, :func:`open_confined`): opened once with ``O_NONBLOCK`` (a FIFO or device
  never blocks the open), ``fstat`` says what was opened, anything but a regular file is refused before a
  byte is read, then ``O_NONBLOCK`` is cleared. Inside a trusted root, no link is followed.
* Removing (:func:`remove_regular`, :func:`remove_stale_temporaries`): only regular files, found by walking
  folders relative to opened descriptors (never through a link, whatever it points to).

The root itself is trusted as named (it may be a link: ``--out /data/out`` pointing at another disk).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FILE_MODE",
    "Confined",
    "LinkInOutputError",
    "NotRegularFileError",
    "UnsafeFolderError",
    "UntrustedLinkError",
    "atomic_write",
    "check_folder_is_safe",
    "confined",
    "open_confined",
    "open_folder",
    "open_regular",
    "open_resolved",
    "read_confined_bytes",
    "read_user_file",
    "remove_regular",
    "remove_stale_temporaries",
    "trusted_link",
]

_NOFOLLOW = os.O_NOFOLLOW
_CLOEXEC = os.O_CLOEXEC
_DIRECTORY = os.O_DIRECTORY


def _read_umask() -> int:
    # os.umask can only be read by setting it: done once at import time, before any writer threads exist.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_read_umask()  # what an ordinary write would give: the temporary is made 0600 first


class LinkInOutputError(OSError):
    """A symbolic link where winclip writes, removes or reads inside a folder it trusts: following it could
    make a (root) cron job write, truncate, delete or show files anywhere, so it is refused instead."""

    def __init__(self, path: Path | str) -> None:
        super().__init__(
            errno.ELOOP,
            f"{path} is a symbolic link; winclip never writes through links inside its output folder "
            "(remove the link or choose another --out)",
        )


class NotRegularFileError(OSError):
    """A FIFO, device, socket or folder where winclip expects a regular file (reading one could block)."""

    def __init__(self, path: Path | str, mode: int) -> None:
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        super().__init__(errno.EINVAL, f"{path} is {kind}, not a regular file")
        self.filename = str(path)


class UnsafeFolderError(OSError):
    """A folder winclip keeps files in by name (its state, the cache) that another user could rename
    things in, or that belongs to another user: see :func:`check_folder_is_safe`."""

    def __init__(self, message: str, path: Path | str) -> None:
        super().__init__(errno.EPERM, message)
        self.filename = str(path)


def check_folder_is_safe(fd: int, shown: Path | str) -> None:
    """UnsafeFolderError unless the opened folder ``fd`` belongs to the user running winclip or to root,
    and is not writable by every user without the sticky bit (sshd's StrictModes rule).

    Whoever can write in a folder can rename what is in it, a folder of winclip's included, and put a link
    in its place at any moment; the sticky bit (as /tmp has) allows only the owner of an entry to rename it."""
    info = os.fstat(fd)
    if info.st_uid not in (os.geteuid(), 0):
        raise UnsafeFolderError(
            f"{shown} belongs to another user (uid {info.st_uid}), who could swap what winclip keeps in it; "
            f"use a folder of your own (or chown it to this user)",
            shown,
        )
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        raise UnsafeFolderError(
            f"{shown} is writable by every user without the sticky bit, so another user could swap what "
            f"winclip keeps in it; run chmod o-w {shown} (or chmod +t {shown}), or choose another folder",
            shown,
        )


@dataclass(frozen=True)
class Confined:
    """``root/relpath``, where ``root`` is trusted as named and nothing below it may be a link."""

    root: Path
    relpath: str

    def __post_init__(self) -> None:
        parts = [part for part in self.relpath.split("/") if part not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"not a plain relative path: {self.relpath!r}")
        object.__setattr__(self, "relpath", "/".join(parts))

    @property
    def parts(self) -> list[str]:
        return self.relpath.split("/")

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def path(self) -> Path:
        return Path(self.root) / self.relpath

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def confined(target: Path | str | Confined) -> Confined:
    """A plain path is confined to its own folder: the folder is trusted, the file may not be a link."""
    if isinstance(target, Confined):
        return target
    path = Path(target)
    return Confined(path.parent, path.name)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _open_root(root: Path) -> int:
    return os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)


def _open_child_dir(name: str, dir_fd: int, shown: Path) -> int:
    try:
        return os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(name, dir_fd):
            raise LinkInOutputError(shown) from None
        if err.errno == errno.ENOTDIR:
            raise NotADirectoryError(errno.ENOTDIR, f"{shown} is not a folder") from None
        raise


@contextmanager
def open_folder(root: Path, folders: list[str], *, create: bool = True, folder_mode: int = 0o777) -> Iterator[int]:
    """A descriptor of ``root/folders...``, every step opened without following a link (missing folders
    are created when ``create``, with ``folder_mode`` less the umask, else FileNotFoundError). Closed on exit."""
    fd = _open_root(root)
    try:
        shown = Path(root)
        for part in folders:
            shown = shown / part
            try:
                child = _open_child_dir(part, fd, shown)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, folder_mode, dir_fd=fd)
                except FileExistsError:
                    pass  # another writer thread made it a moment ago (or a link: refused next)
                child = _open_child_dir(part, fd, shown)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _temporary_name(name: str) -> str:
    # Cut short so that the prefix, the random part and the suffix still fit in 255 bytes.
    return f".{name[:50]}.{secrets.token_hex(8)}.tmp"


@contextmanager
def atomic_write(
    target: Path | Confined, *, fsync: bool = True, mode: int | None = None, folder_mode: int = 0o777
) -> Iterator[BinaryIO]:
    """A binary file to write; on success it replaces ``target`` atomically, on error it is removed.

    Readers see the old file or the complete new one. See the module docstring for why no link planted
    at any moment can redirect the write. ``mode``: the final permissions (default: as the umask gives).
    """
    where = confined(target)
    if not isinstance(target, Confined):
        where.root.mkdir(parents=True, exist_ok=True)  # the folder the caller named is trusted as named
    with open_folder(where.root, where.parts[:-1], folder_mode=folder_mode) as folder:
        for _ in range(100):
            tmp = _temporary_name(where.name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=folder)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 64 random bits
            raise FileExistsError(errno.EEXIST, f"cannot create a temporary file beside {where}")
        handle = os.fdopen(fd, "wb")
        # for writers that want a name (tifffile): never opened. FileIO.name is writable; typeshed's raw type lacks it
        handle.raw.name = str(where.path.with_name(tmp))  # type: ignore[attr-defined]
        try:
            yield handle
            handle.flush()
            os.fchmod(fd, FILE_MODE if mode is None else mode)
            if fsync:
                # Without this a power cut after the rename can leave an empty file under the final name.
                os.fsync(fd)
            written = os.fstat(fd)
            handle.close()
            now = os.lstat(tmp, dir_fd=folder)
            if (now.st_dev, now.st_ino) != (written.st_dev, written.st_ino):
                raise OSError(errno.EEXIST, f"the temporary file beside {where} was replaced by someone else")
            try:
                os.replace(tmp, where.name, src_dir_fd=folder, dst_dir_fd=folder)
            except OSError as err:  # e.g. a folder at the final name: say that name, not the temporary's
                raise OSError(err.errno, err.strerror, str(where.path)) from None
        except BaseException:
            # BaseException: Ctrl-C mid-write must not leave a stray .tmp behind either.
            handle.close()
            try:
                if stat.S_ISREG(os.lstat(tmp, dir_fd=folder).st_mode):
                    os.unlink(tmp, dir_fd=folder)
            except OSError:
                pass
            raise
        if fsync:
            try:
                os.fsync(folder)
            except OSError:
                pass


def _regular_from_fd(fd: int, shown: Path | str) -> BinaryIO:
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(shown, info.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    handle = os.fdopen(fd, "rb")
    handle.raw.name = os.fspath(shown)  # type: ignore[attr-defined]  # FileIO.name, as above
    return handle


class UntrustedLinkError(OSError):
    """A link that neither this user nor the owner of what it leads to made (see :func:`open_resolved`)."""

    def __init__(self, path: Path | str, link: str, owner: int, target_owner: int) -> None:
        super().__init__(
            errno.EPERM,
            f"{path}: the symbolic link {link} belongs to uid {owner}, what it leads to to uid {target_owner}; "
            "winclip follows a link only when it belongs to the user running winclip or to the owner of its target",
        )
        self.filename = str(path)


_MAX_LINKS = 40  # as the kernel: more is a loop


def open_resolved(path: Path | str, *, directory: bool = False) -> int:
    """A descriptor of ``path`` (O_RDONLY | O_NONBLOCK), resolved one component at a time, relative to the
    folder opened before, so that each link met on the way is checked before it is followed.

    The rule (the kernel's fs.protected_symlinks, applied everywhere): a link is followed only when it
    belongs to the user running winclip, or to the owner of what it leads to. So a root job never
    follows another user's link to root's (or a third user's) files, at any moment: the check is made
    on what was actually opened. Raises UntrustedLinkError, or the OSError of the open."""
    text = os.fspath(path)
    if not text.startswith("/"):
        text = os.getcwd() + "/" + text
    pending: list[object] = list(reversed(text.split("/")))  # a stack: next component last
    euid = os.geteuid()
    followed = 0
    fd = os.open("/", os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        while pending:
            item = pending.pop()
            if isinstance(item, tuple):  # what a link led to is now open: check its owner
                link, owner = item
                target_owner = os.fstat(fd).st_uid
                if owner not in (euid, target_owner):
                    raise UntrustedLinkError(path, link, owner, target_owner)
                continue
            name = str(item)
            if name in ("", "."):
                continue
            last = not any(isinstance(rest, str) and rest not in ("", ".") for rest in pending)
            flags = os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC
            if not last or directory or name == "..":
                flags |= _DIRECTORY
            try:
                child = os.open(name, flags, dir_fd=fd)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                info = os.lstat(name, dir_fd=fd)
                if not stat.S_ISLNK(info.st_mode):
                    raise
                followed += 1
                if followed > _MAX_LINKS:
                    raise OSError(errno.ELOOP, "Too many levels of symbolic links", text) from None
                target = os.readlink(name, dir_fd=fd)
                again = os.lstat(name, dir_fd=fd)
                if (again.st_dev, again.st_ino, again.st_uid) != (info.st_dev, info.st_ino, info.st_uid):
                    raise OSError(errno.EAGAIN, "a link changed while it was read", text) from None
                pending.append((name, info.st_uid))
                pending.extend(reversed(target.split("/")))
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", os.O_RDONLY | _DIRECTORY | _CLOEXEC)
                continue
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path | str, *, follow_links: bool = True) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file (never blocks on a FIFO or device).

    Links on the way are followed by the rule of :func:`open_resolved`; ``follow_links=False``: a link at
    ``path`` itself is refused (LinkInOutputError)."""
    if follow_links:
        fd = open_resolved(path)
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC | _NOFOLLOW)
        except OSError as err:
            if err.errno == errno.ELOOP and os.path.islink(path):
                raise LinkInOutputError(path) from None
            raise
    return _regular_from_fd(fd, path)


def trusted_link(path: Path | str) -> bool:
    """Whether the link at ``path`` may be followed by the rule of :func:`open_resolved` (by name: for
    listing folders; every open checks again on what it opened)."""
    try:
        link_owner = os.lstat(path).st_uid
        return link_owner in (os.geteuid(), os.stat(path).st_uid)
    except OSError:
        return False


def open_confined(target: Path | Confined) -> BinaryIO:
    """A regular file inside a trusted root, opened without following any link below the root."""
    where = confined(target)
    with open_folder(where.root, where.parts[:-1], create=False) as folder:
        try:
            fd = os.open(where.name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=folder)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise LinkInOutputError(where.path) from None
            raise
    return _regular_from_fd(fd, where.path)


CALIBRATION_LIMIT = 16 << 20  # a calibration file is a few KB


def read_user_file(path: Path | str, limit: int) -> bytes:
    """The bytes of a file named by the user (links by the rule of :func:`open_resolved`, never blocking on
    a FIFO); OSError (EFBIG) when it holds more than ``limit``."""
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data


def read_confined_bytes(target: Path | Confined, limit: int) -> bytes:
    """The bytes of a regular file inside a trusted root; OSError (EFBIG) when it holds more than ``limit``."""
    with open_confined(target) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"{target} is larger than {limit} bytes")
    return data


def remove_regular(target: Path | Confined) -> bool:
    """Delete ``target`` if it is a regular file reached without any link below its root; True if deleted.

    A link (as the file or as any folder on the way) is left alone, never followed: clean-up must not delete
    what a link leads to, even inside the output folder."""
    where = confined(target)
    try:
        with open_folder(where.root, where.parts[:-1], create=False) as folder:
            if not stat.S_ISREG(os.lstat(where.name, dir_fd=folder).st_mode):
                return False
            os.unlink(where.name, dir_fd=folder)
            return True
    except (FileNotFoundError, LinkInOutputError, NotADirectoryError):
        return False


def remove_stale_temporaries(root: Path, folder: str, *, recursive: bool, prefix: str = ".") -> int:
    """Delete the regular files named ``PREFIX*.tmp`` in ``root/folder`` (and below when ``recursive``),
    walking by descriptors: a linked folder is never entered, a link named like a temporary is left."""
    try:
        with open_folder(root, [part for part in folder.split("/") if part], create=False) as top:
            return _remove_temporaries_below(top, prefix, recursive)
    except (FileNotFoundError, LinkInOutputError, NotADirectoryError):
        return 0


def _remove_temporaries_in(folder: int, prefix: str) -> tuple[int, list[str]]:
    """Remove the temporaries directly in ``folder``; return how many, and the names of its sub-folders."""
    removed, subfolders = 0, []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.name)
            elif entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                try:
                    if stat.S_ISREG(os.lstat(entry.name, dir_fd=folder).st_mode):
                        os.unlink(entry.name, dir_fd=folder)
                        removed += 1
                except OSError:
                    pass
    return removed, subfolders


def _remove_temporaries_below(top: int, prefix: str, recursive: bool) -> int:
    # Not os.fwalk: it opens each sub-folder without O_DIRECTORY, which blocks on a FIFO swapped in.
    # A stack of (folder, sub-folders left), not recursion: a tree may be thousands of folders deep;
    # only the folders on the current branch are open.
    removed, subfolders = _remove_temporaries_in(top, prefix)
    if not recursive:
        return removed
    stack: list[tuple[int, list[str]]] = [(os.dup(top), subfolders)]
    try:
        while stack:
            folder, left = stack[-1]
            if not left:
                os.close(stack.pop()[0])
                continue
            name = left.pop()
            try:
                child = _open_child_dir(name, folder, Path(name))
            except OSError:
                continue  # a link or something else by now (or too deep to open): never entered
            try:
                count, below = _remove_temporaries_in(child, prefix)
            except OSError:
                os.close(child)
                continue
            removed += count
            stack.append((child, below))
    finally:
        for folder, _ in stack:
            os.close(folder)
    return removed

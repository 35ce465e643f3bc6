"""Where the images come from: a local folder, a text file of paths, or an object-store prefix.

Each source lists its inputs as a stream of :class:`Entry` (never the whole list in memory: a
folder is read one directory at a time) and reads an entry's bytes. Every input gets an entry,
including the ones that will not be read: ``problem`` then says why, and becomes the row's error.

Local folders keep the scorer's file rules. Only regular files inside the folder are read:
symlinks to folders are not followed, a symlink leading out of the folder is not read, and
dangling or looping symlinks, FIFOs, sockets and devices are never opened. Hidden files and
folders are skipped and counted. A list of paths names exactly what to read, so its symlinks are
followed; special files are still never opened. An object store has neither symlinks nor special
files; its "folders" are key prefixes, listed one level at a time.
"""

from __future__ import annotations

import os
import stat
from typing import Iterator, NamedTuple

from model_store.errors import UsageError

SPECIAL_FILES = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}
STORE_READ_THREADS = 16  # an object-store GET waits tens of milliseconds: keep many in flight


class Entry(NamedTuple):
    name: str  # the row's path and id: "/"-separated below the folder or prefix, or the list's line
    location: str  # what to read: a local path (a symlink's resolved target) or a store path
    problem: str = ""  # why it is not read; empty for a file to read


class FolderSource:
    """Every entry below a local folder: a folder's files in the order the file system lists them,
    then its subfolders in name order, depth first. One ``scandir`` at a time and no ``stat`` for
    plain files and folders; an explicit stack, so a deep tree cannot exhaust the recursion limit."""

    read_threads = 1
    can_list_twice = True

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise UsageError(f"folder {folder} does not exist or is not a folder")
        self.folder = folder
        self.hidden = 0  # hidden entries skipped so far

    def describe(self) -> str:
        return f"folder {os.path.realpath(self.folder)}"

    def entries(self) -> Iterator[Entry]:
        root = os.path.realpath(self.folder)
        pending = [""]  # prefixes of the folders still to list, the next one last
        while pending:
            prefix = pending.pop()
            subfolders = []
            try:
                with os.scandir(os.path.join(self.folder, prefix)) as children:
                    for child in children:
                        if child.name.startswith("."):
                            self.hidden += 1
                        elif child.is_dir(follow_symlinks=False):
                            subfolders.append(child.name)
                        else:
                            yield _classify(child, prefix + child.name, root)
            except OSError as err:
                if not prefix:
                    raise
                yield Entry(prefix.removesuffix("/"), os.path.join(self.folder, prefix), f"cannot list folder: {err}")
            pending.extend(f"{prefix}{name}/" for name in sorted(subfolders, reverse=True))

    def read(self, location: str) -> bytes:
        return read_regular_file(location)


class ListSource:
    """The paths in a text file or a pipe, one per line, each exactly as written (a name is its
    bytes up to the newline); a relative path is relative to the current folder, as ``find`` wrote
    it. Empty lines are skipped."""

    read_threads = 1
    hidden = 0

    def __init__(self, list_file: str):
        self.list_file = list_file
        self.can_list_twice = os.path.isfile(list_file)  # not a pipe: `find ... | cnn-score /dev/stdin`

    def describe(self) -> str:
        # a pipe is named as given: /dev/stdin resolves to a new pipe:[inode] on every run
        return f"list {os.path.realpath(self.list_file) if self.can_list_twice else self.list_file}"

    def entries(self) -> Iterator[Entry]:
        with open(self.list_file, "rb") as lines:
            for line in lines:
                if line := line.removesuffix(b"\n"):
                    name = os.fsdecode(line)
                    yield _listed(name, os.path.abspath(name))

    def read(self, location: str) -> bytes:
        return read_regular_file(location)


class StoreSource:
    """Every object below a prefix of a ``pyarrow.fs`` file system (``s3://``, ``gs://``, ``hdfs://``,
    ``abfs://``, ``file://``), one listing call per level of "folders", each level in name order.
    Nothing here assumes a local disk: the file system object is what reads."""

    read_threads = STORE_READ_THREADS
    can_list_twice = True

    def __init__(self, uri: str):
        import pyarrow.fs

        try:
            self.fs, root = pyarrow.fs.FileSystem.from_uri(uri)
        except (ValueError, pyarrow.ArrowException) as err:  # an unknown scheme or a malformed URI
            raise UsageError(f"cannot open {uri}: {err}") from None
        self.uri, self.root = uri, root.rstrip("/")
        if self.fs.get_file_info(self.root).type != pyarrow.fs.FileType.Directory:
            raise UsageError(f"{uri} is not a prefix holding objects")
        self.hidden = 0

    def describe(self) -> str:
        return f"store {self.uri.rstrip('/')}"

    def entries(self) -> Iterator[Entry]:
        from pyarrow.fs import FileSelector, FileType

        pending = [""]
        while pending:
            prefix = pending.pop()
            listing = self.fs.get_file_info(FileSelector(f"{self.root}/{prefix}".rstrip("/"), recursive=False))
            subfolders = []
            for info in sorted(listing, key=lambda info: info.base_name):
                name = info.base_name
                if name.startswith("."):
                    self.hidden += 1
                elif info.type == FileType.Directory:
                    subfolders.append(name)
                elif info.type == FileType.File:
                    yield Entry(prefix + name, info.path)
                else:
                    yield Entry(prefix + name, info.path, f"not a file but {info.type.name}; not opened")
            pending.extend(f"{prefix}{name}/" for name in sorted(subfolders, reverse=True))

    def read(self, location: str) -> bytes:
        with self.fs.open_input_stream(location) as stream:
            return stream.readall()


Source = FolderSource | ListSource | StoreSource


def open_source(source: str) -> Source:
    """The source that ``source`` names: a URI with a scheme, a local folder, or a local file of paths."""
    if "://" in source:
        return StoreSource(source)
    if os.path.isdir(source):
        return FolderSource(source)
    if not os.path.exists(source):
        raise UsageError(f"{source} does not exist: give a folder, a file of paths or a URI")
    return ListSource(source)


def _classify(child: os.DirEntry, name: str, root: str) -> Entry:
    """The entry to read, or the reason it is not read; a symlink is judged by its resolved target."""
    try:
        if child.is_file(follow_symlinks=False):
            return Entry(name, child.path)
        path = child.path
        if child.is_symlink():
            link = os.readlink(path)
            try:
                path = os.path.realpath(path, strict=True)
            except OSError as err:
                return Entry(name, path, f"dangling or looping symlink to {link!r}: {err.strerror}")
            if os.path.commonpath([root, path]) != root:
                return Entry(name, path, f"symlink to {link!r} leads outside the folder; not read")
        return _by_mode(name, path, os.stat(path).st_mode, "symlink to a folder; folder symlinks are not followed")
    except OSError as err:  # vanished or changed since the folder was listed
        return Entry(name, child.path, str(err))


def _listed(name: str, path: str) -> Entry:
    try:
        path = os.path.realpath(path, strict=True)
        return _by_mode(name, path, os.stat(path).st_mode, "a folder; list the files in it instead")
    except OSError as err:
        return Entry(name, path, str(err))


def _by_mode(name: str, path: str, mode: int, folder_problem: str) -> Entry:
    if stat.S_ISREG(mode):
        return Entry(name, path)
    if stat.S_ISDIR(mode):
        return Entry(name, path, folder_problem)
    kind = SPECIAL_FILES.get(stat.S_IFMT(mode), "special file")
    return Entry(name, path, f"not a regular file but a {kind}; not opened")


def read_regular_file(path: str) -> bytes:
    """The bytes of a regular file. Non-blocking and not following a final symlink: a FIFO or link
    swapped in since the listing is refused rather than waited on or followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is no longer a regular file; not read")
        # plain os.read: a file object costs a fifth of a small PNG's decode. A read shorter than
        # asked for is the end of a regular file; one that fills the request means it has grown.
        data = os.read(fd, info.st_size + 1)
        if len(data) <= info.st_size:
            return data
        chunks = [data]
        while chunks[-1]:
            chunks.append(os.read(fd, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(fd)

"""Storage: every file a run or sweep owns, in a local or shared folder or in an object store (s3://, gs://).

A location is a :class:`pathlib.Path` (a local or shared filesystem, as before) or an :class:`ObjectPath`
(``s3://bucket/prefix/...``, ``gs://bucket/...``); :func:`location` makes one from a string. The functions
here read, write, list and delete at either kind, so the rest of the project writes each file once:

- object stores go through ``pyarrow.fs`` (S3FileSystem, GcsFileSystem), the filesystem Ray Train and
  Tune write their own files with; :func:`ray_storage` hands Ray the same filesystem object;
- local paths go through the OS calls directly (pyarrow's LocalFileSystem makes the same calls, with
  other error texts), with the permissions of :func:`akod_ray.config.make_dirs`.

Publishing a file ("atomic"): a reader sees the old content or the new one, never a half-written file.
- local: the content goes to a temporary name beside the file, which is then renamed over it;
- object store: there is no rename. The object is written once, whole, under its final key: one PUT,
  or a multipart upload that the store makes visible only when it completes, and pyarrow completes it
  only when every part arrived. A writer killed mid-upload leaves no object (or the old one).
  What spans several objects (a checkpoint folder) is published with a manifest, written last:
  :func:`publish_folder`, :func:`complete_files`.

Appending (``metrics.jsonl``, ``rl/*.jsonl``): local files are appended to; an object is read, extended
and written whole again (:func:`append_jsonl`). Each such file has one writer (rank 0, or the driver),
so nothing is lost; the cost is one GET and one PUT of the file per record (BENCHMARKS.md, "Storage").

Endpoints and credentials come from the variables AWS tools read: ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (an S3-compatible server, e.g. ``http://127.0.0.1:9000``), ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, and the AWS SDK's own chain for credentials (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance profile); for gs://, Google's application default
credentials (``STORAGE_EMULATOR_HOST`` for an emulator).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Union

from akod_ray.errors import AkodError

SCHEMES = ("s3", "gs")
MANIFEST = "manifest.json"  # written last into a folder published to an object store (publish_folder)
MANIFEST_FORMAT = "akod_manifest/1"


class StorageError(AkodError):
    """An object store that cannot be reached or used (endpoint, bucket, credentials); one line."""


# --------------------------------------------------------------------------- locations


class ObjectPath:
    """A path in an object store: ``scheme://bucket/key``, with the pure-path operations of pathlib
    (``/``, name, parent, suffix, with_name, relative_to). It has no ``__fspath__``: handing it to a
    local file function is a TypeError, never a stray local folder named ``s3:``."""

    __slots__ = ("scheme", "key")

    def __init__(self, uri: str):
        scheme, sep, rest = str(uri).partition("://")
        if not sep or scheme not in SCHEMES:
            raise StorageError(f"{uri!r} is not an object store URI ({', '.join(s + '://' for s in SCHEMES)})")
        parsed = urllib.parse.urlsplit(str(uri))
        if parsed.query or parsed.fragment:
            raise StorageError(f"{uri!r}: an object store URI takes no ?query or #fragment (the endpoint comes "
                               "from AWS_ENDPOINT_URL)")
        parts = [p for p in rest.split("/") if p]
        if not parts:
            raise StorageError(f"{uri!r} names no bucket")
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"{uri!r} must not hold '.' or '..' components")
        self.scheme, self.key = scheme, "/".join(parts)

    @classmethod
    def _of(cls, scheme: str, key: str) -> "ObjectPath":
        p = object.__new__(cls)
        p.scheme, p.key = scheme, key
        return p

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and (self.scheme, self.key) == (other.scheme, other.key)

    def __lt__(self, other: "ObjectPath") -> bool:
        return (self.scheme, self.key) < (other.scheme, other.key)

    def __hash__(self) -> int:
        return hash((self.scheme, self.key))

    def __truediv__(self, other: str) -> "ObjectPath":
        parts = [p for p in str(other).split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise StorageError(f"{other!r}: an object path takes no '.' or '..' components")
        return ObjectPath._of(self.scheme, "/".join([self.key, *parts]))

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> "ObjectPath":
        head = posixpath.dirname(self.key)
        return ObjectPath._of(self.scheme, head) if head else self

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def relative_to(self, other: "ObjectPath") -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def resolve(self) -> "ObjectPath":
        return self

    def expanduser(self) -> "ObjectPath":
        return self


StoragePath = Union[Path, ObjectPath]


def is_uri(text: str | os.PathLike | ObjectPath) -> bool:
    """Does ``text`` name an object store (s3://, gs://)? Any other ``scheme://`` is no local path either."""
    return isinstance(text, ObjectPath) or "://" in str(text)


def location(p: str | os.PathLike | ObjectPath) -> StoragePath:
    """An :class:`ObjectPath` for an s3:// or gs:// URI, else a Path."""
    if isinstance(p, (ObjectPath, Path)):
        return p
    return ObjectPath(str(p)) if is_uri(p) else Path(p)


def is_remote(p) -> bool:
    """Is ``p`` in an object store (an ObjectPath, or a string URI)?"""
    return isinstance(p, ObjectPath) or (isinstance(p, str) and is_uri(p))


def local_folder(p) -> Path:
    """Where a run keeps what stays on the machine that runs `akod` (ray.log, error.log): its own folder, or
    for a folder in an object store ``$TMPDIR/akod/<scheme>/<bucket>/<key>``."""
    p = location(p)
    if isinstance(p, ObjectPath):
        return Path(tempfile.gettempdir()) / "akod" / p.scheme / p.key
    return p


# --------------------------------------------------------------------------- filesystems


def endpoint() -> str | None:
    """The S3 endpoint URL from the environment, as AWS tools read it (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_options() -> dict:
    options: dict = {"connect_timeout": 5.0, "request_timeout": 60.0}
    url = endpoint()
    if url:
        parts = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
        options.update(scheme=parts.scheme or "https", endpoint_override=parts.netloc + parts.path.rstrip("/"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return options


_FILESYSTEMS: dict = {}
_LOCK = threading.Lock()


def filesystem(scheme: str):
    """The pyarrow filesystem of ``scheme`` as the environment configures it now (cached per configuration)."""
    import pyarrow.fs as pafs

    if scheme == "s3":
        options = _s3_options()
        key = ("s3", tuple(sorted(options.items())), os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    elif scheme == "gs":
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        options = {}
        if emulator:
            parts = urllib.parse.urlsplit(emulator if "://" in emulator else "http://" + emulator)
            options = {"anonymous": True, "scheme": parts.scheme, "endpoint_override": parts.netloc}
        key = ("gs", tuple(sorted(options.items())))
    else:
        raise ValueError(f"no filesystem for scheme {scheme!r}")
    with _LOCK:
        fs = _FILESYSTEMS.get(key)
        if fs is None:
            fs = pafs.S3FileSystem(**options) if scheme == "s3" else pafs.GcsFileSystem(**options)
            _FILESYSTEMS[key] = fs
    return fs


def fs_and_path(p) -> tuple:
    """(pyarrow filesystem, path on it) of a location: for pyarrow.parquet, and Ray's storage."""
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        return filesystem(p.scheme), p.key
    return pafs.LocalFileSystem(), str(Path(p).resolve())


def ray_storage(p) -> dict:
    """``storage_path`` and ``storage_filesystem`` for ray.train / ray.tune RunConfig: a local folder as a
    path; an object store as the bucket/prefix on the same pyarrow filesystem this module uses."""
    p = location(p)
    if isinstance(p, ObjectPath):
        return {"storage_path": p.key, "storage_filesystem": filesystem(p.scheme)}
    return {"storage_path": str(Path(p).resolve())}


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Entry:
    """One child of a folder: its location, whether it is a folder, its size in bytes and mtime (None if unknown)."""

    path: StoragePath
    is_dir: bool
    size: int | None
    mtime: float | None


def _info(p: ObjectPath):
    return filesystem(p.scheme).get_file_info(p.key)


def exists(p) -> bool:
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        return _info(p).type != pafs.FileType.NotFound
    return p.exists()


def is_file(p) -> bool:
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        return _info(p).type == pafs.FileType.File
    return p.is_file()


def is_dir(p) -> bool:
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        return _info(p).type == pafs.FileType.Directory
    return p.is_dir()


def size(p) -> int | None:
    """The size of a file in bytes, or None when it does not exist."""
    p = location(p)
    if isinstance(p, ObjectPath):
        info = _info(p)
        return info.size if info.is_file else None
    try:
        return p.stat().st_size if p.is_file() else None
    except OSError:
        return None


def read_bytes(p) -> bytes:
    """The whole file; FileNotFoundError when there is none."""
    p = location(p)
    if isinstance(p, ObjectPath):
        with filesystem(p.scheme).open_input_stream(p.key) as f:
            return f.readall()
    return p.read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def _entry(info, scheme: str) -> Entry:
    mtime = info.mtime.timestamp() if info.mtime is not None else None
    return Entry(ObjectPath._of(scheme, info.path), info.type.name == "Directory", info.size if info.is_file else None,
                 mtime)


def list_dir(p) -> list[Entry]:
    """The children of a folder, sorted by name; none when it does not exist."""
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        infos = filesystem(p.scheme).get_file_info(pafs.FileSelector(p.key, allow_not_found=True))
        return sorted((_entry(i, p.scheme) for i in infos), key=lambda e: e.path.name)
    if not p.is_dir():
        return []
    out = []
    for d in os.scandir(p):
        try:
            st = d.stat()
            out.append(Entry(Path(d.path), d.is_dir(), None if d.is_dir() else st.st_size, st.st_mtime))
        except OSError:  # removed meanwhile
            continue
    return sorted(out, key=lambda e: e.path.name)


def walk_files(p) -> list[Entry]:
    """Every file at any depth under a folder (no folders), sorted by path."""
    import pyarrow.fs as pafs

    p = location(p)
    if isinstance(p, ObjectPath):
        infos = filesystem(p.scheme).get_file_info(pafs.FileSelector(p.key, allow_not_found=True, recursive=True))
        return sorted((_entry(i, p.scheme) for i in infos if i.is_file), key=lambda e: e.path.key)
    out = []
    for dirpath, _, names in os.walk(p):
        for n in names:
            f = Path(dirpath) / n
            try:
                st = f.stat()
            except OSError:
                continue
            out.append(Entry(f, False, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: str(e.path))


@contextlib.contextmanager
def local_copy(p) -> Iterator[Path]:
    """A local file with the content of ``p`` (itself when local), for libraries that need a file name
    (safetensors' safe_open, numpy): an object is downloaded to a temporary file, removed afterwards."""
    p = location(p)
    if not isinstance(p, ObjectPath):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="akod_obj_") as tmp:
        local = Path(tmp) / (p.name or "object")
        local.write_bytes(read_bytes(p))
        yield local


# --------------------------------------------------------------------------- writing


def make_dirs(p) -> StoragePath:
    """A local folder and its parents, without group or world write (akod_ray.config.make_dirs); nothing
    to do in an object store, where folders are key prefixes."""
    p = location(p)
    if not isinstance(p, ObjectPath):
        from akod_ray.config import make_dirs as make_local_dirs

        make_local_dirs(p)
    return p


def write_bytes(p, data: bytes) -> StoragePath:
    """Publish ``data`` as the whole file ``p`` (module docstring: a temporary name and a rename locally;
    one whole object in an object store). Parent folders are created."""
    p = location(p)
    if isinstance(p, ObjectPath):
        with filesystem(p.scheme).open_output_stream(p.key) as f:
            f.write(data)
        return p
    return _publish_local(p, lambda tmp: tmp.write_bytes(data))


def _publish_local(p: Path, fill) -> Path:
    """``fill(tmp)`` writes a temporary name beside ``p``, which is then renamed over it (parents created)."""
    make_dirs(p.parent)
    tmp = p.with_name(f"{p.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        fill(tmp)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_text(p, text: str) -> StoragePath:
    return write_bytes(p, text.encode("utf-8"))


def upload_file(local: Path, p) -> StoragePath:
    """Publish the local file ``local`` as ``p`` (:func:`write_bytes`; a local target is copied, then renamed)."""
    p = location(p)
    if isinstance(p, ObjectPath):
        return write_bytes(p, Path(local).read_bytes())
    return _publish_local(p, lambda tmp: shutil.copyfile(local, tmp))


def append_jsonl(p, record: dict) -> None:
    """Add one JSON line to ``p`` (module docstring: appended locally; the object rewritten whole)."""
    line = json.dumps(record) + "\n"
    p = location(p)
    if isinstance(p, ObjectPath):
        try:
            old = read_bytes(p)
        except FileNotFoundError:
            old = b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        write_bytes(p, old + line.encode("utf-8"))
        return
    make_dirs(p.parent)
    with p.open("a") as f:
        f.write(line)


def delete(p) -> None:
    """Remove a file if it is there."""
    p = location(p)
    if isinstance(p, ObjectPath):
        with contextlib.suppress(FileNotFoundError):
            filesystem(p.scheme).delete_file(p.key)
        return
    p.unlink(missing_ok=True)


def delete_tree(p) -> None:
    """Remove a folder and everything under it, if it is there. A published folder loses its manifest
    first, so a reader never takes a half-deleted one for complete."""
    p = location(p)
    if isinstance(p, ObjectPath):
        delete(p / MANIFEST)
        with contextlib.suppress(FileNotFoundError):
            filesystem(p.scheme).delete_dir(p.key)
        return
    shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------- folders published whole


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Write ``folder/manifest.json`` for the files of a local folder: each file's size and sha256. A folder
    whose manifest is missing, or whose files do not match it, is not complete (:func:`complete_files`)."""
    files = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST}
    return write_text(Path(folder) / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}))


def read_manifest(folder) -> dict | None:
    """``{name: {"size", "sha256"}}`` from a folder's manifest; None when it has none or it is not one."""
    try:
        data = json.loads(read_bytes(location(folder) / MANIFEST))
    except (FileNotFoundError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT else None
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        return None
    return files


def complete_files(folder) -> dict | None:
    """The manifest's files when the folder holds its manifest and every file it lists at its listed size;
    else None (a torn upload, or a deletion half done)."""
    files = read_manifest(folder)
    if files is None:
        return None
    sizes = {e.path.name: e.size for e in list_dir(folder) if not e.is_dir}
    return files if all(sizes.get(name) == meta["size"] for name, meta in files.items()) else None


def manifest_problem(folder, name: str, local: Path) -> str | None:
    """Why the local copy ``local`` of ``folder/name`` does not match the folder's manifest, or None (it
    matches, or the folder has no manifest: a folder of an earlier version, or renamed into place locally)."""
    files = read_manifest(folder)
    if files is None:
        return None
    meta = files.get(name)
    if meta is None:
        return f"its folder's {MANIFEST} does not list it"
    n = Path(local).stat().st_size
    if n != meta["size"]:
        return f"it holds {n:,} bytes, its folder's {MANIFEST} lists {meta['size']:,} (an incomplete upload?)"
    if sha256_file(local) != meta["sha256"]:
        return f"its sha256 does not match its folder's {MANIFEST}"
    return None


def publish_folder(staging: Path, dest) -> StoragePath:
    """Put the local folder ``staging`` (files only, with its manifest: :func:`write_manifest`) at ``dest``.

    Local: ``staging`` (beside ``dest``) is renamed to ``dest``, replacing an older one. Object store: an
    older ``dest`` is deleted (its manifest first), each file is uploaded, and the manifest last."""
    dest = location(dest)
    if not isinstance(dest, ObjectPath):
        if dest.exists():
            shutil.rmtree(dest)
        Path(staging).rename(dest)
        return dest
    delete_tree(dest)
    files = sorted(f for f in Path(staging).iterdir() if f.is_file())
    for f in [f for f in files if f.name != MANIFEST] + [f for f in files if f.name == MANIFEST]:
        upload_file(f, dest / f.name)
    return dest


# --------------------------------------------------------------------------- checks


def check_reachable(p, what: str) -> None:
    """Fail in one line naming ``what`` when the object store of ``p`` cannot be used: no answer from the
    endpoint, refused credentials, or no such bucket. Local paths are left to the folder checks."""
    import pyarrow.fs as pafs

    p = location(p)
    if not isinstance(p, ObjectPath):
        return
    where = endpoint() if p.scheme == "s3" and endpoint() else f"the default {p.scheme} endpoint"
    try:
        info = filesystem(p.scheme).get_file_info(p.bucket)
    except OSError as e:
        raise StorageError(f"{what} {str(p)!r}: cannot use the object store at {where}: {describe(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {str(p)!r}: bucket {p.bucket!r} does not exist at {where}")


def check_writable(p, what: str) -> None:
    """:func:`check_reachable`, and a small object written and removed under ``p`` (the credentials may write)."""
    check_reachable(p, what)
    p = location(p)
    if not isinstance(p, ObjectPath):
        return
    probe = p / f".akod_write_check-{os.getpid()}"
    try:
        write_bytes(probe, b"")
        delete(probe)
    except OSError as e:
        raise StorageError(f"{what} {str(p)!r} cannot be written: {describe(e)}") from None


def describe(e: BaseException) -> str:
    """pyarrow's error in one line, with a hint for the usual causes."""
    text = " ".join(str(e).split()) or type(e).__name__
    hints = (("NETWORK_CONNECTION", "nothing answers there (AWS_ENDPOINT_URL)"),
             ("ACCESS_DENIED", "access denied (credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance profile)"),
             ("INVALID_ACCESS_KEY_ID", "the access key is unknown (AWS_ACCESS_KEY_ID)"),
             ("SIGNATURE_DOES_NOT_MATCH", "the secret key does not match (AWS_SECRET_ACCESS_KEY)"),
             ("No response body", "nothing answers there (AWS_ENDPOINT_URL)"))
    for marker, hint in hints:
        if marker in text:
            return f"{hint}: {text[:300]}"
    return text[:400]

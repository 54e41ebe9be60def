"""Where the images come from, normalised once: a folder, an object-storage prefix,
WebDataset tar shards or a file list.

    as_source("photos/")                              # folder: keys are paths relative to it
    as_source("s3://bucket/renders/")                 # prefix: keys are paths relative to it
    as_source("data/train-{000000..000127}.tar")      # shards: keys are SHARD/SAMPLEKEY.EXT
    as_source("shards/")                              # a folder (or prefix) holding only .tar files
    as_source("photos/", files="keep.txt")            # only the listed images, in the list's order

`Source.discover()` lists the images as `ImageItem`s (a tar sample's item names its
shard and member) plus the `Failure`s found while listing (a missing shard, a sample
with no image member, a truncated tar, a listed file that does not exist). Remote
paths are opened with fsspec (s3fs for `s3://`) through `Remote`, which is picklable
and makes its filesystem in whichever process uses it: DataLoader workers fork, and
fsspec's filesystems notice a new process where obstore's do not.
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

from featstore.batches import Failure, ImageItem
from featstore.errors import ConfigError
from featstore.images import IMAGE_EXTENSIONS, discover
from featstore.store.location import Location, as_location, fsspec_options, is_timeout, remote_fs

__all__ = ["Discovered", "Remote", "Source", "as_source", "expand_braces", "with_retries"]

# The image members WebDataset samples carry, in the order one is chosen when a sample has several.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FETCH_ATTEMPTS = 4  # per remote object or shard: the first try and three retries
FETCH_BACKOFF_S = 0.5  # doubled after each failed try

T = TypeVar("T")


# ---------------------------------------------------------------- remote reads


def _permanent(e: BaseException) -> bool:
    """Errors a retry cannot fix (a missing object, refused credentials, a bad tar)."""
    if is_timeout(e):  # the request already had its tries (FEATSTORE_S3_ATTEMPTS)
        return True
    return isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, tarfile.TarError, EOFError))


def with_retries(
    fn: Callable[[], T], *, attempts: int = FETCH_ATTEMPTS, backoff_s: float = FETCH_BACKOFF_S, sleep=time.sleep
) -> T:
    """`fn()`, tried again after `backoff_s`, 2 x `backoff_s`, ... on errors a retry can fix."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:
            if _permanent(e) or attempt == attempts - 1:
                raise
            sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def fetch_error(e: BaseException) -> str:
    """A one-line reason for a remote read that failed for good."""
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"cannot read after {FETCH_ATTEMPTS} tries: {type(e).__name__}: {msg}"


@dataclass(frozen=True, slots=True)
class Remote:
    """Reads remote paths; `storage_options` apply to `protocol` (other protocols get the defaults)."""

    protocol: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def fs(self, url: str) -> Any:
        protocol = url.partition("://")[0]
        given = self.storage_options if protocol == self.protocol else {}
        # fsspec caches instances per process: a forked worker gets its own, not the parent's.
        return remote_fs(protocol, fsspec_options(Location(url, protocol, dict(given))))

    def fetch(self, url: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, its first `limit` bytes at most (a ranged request)."""
        if limit is None:
            return with_retries(lambda: self.fs(url).cat_file(url))
        return with_retries(lambda: self.fs(url).cat_file(url, start=0, end=limit))

    def open(self, url: str) -> IO[bytes]:
        # Read ahead in large blocks: a tar shard is read from start to end.
        return self.fs(url).open(url, "rb", block_size=8 << 20, cache_type="readahead")


def is_url(text: str) -> bool:
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isalnum() and scheme.lower() not in ("file", "local")


# ---------------------------------------------------------------- brace ranges


_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept); `{x,y}` lists too."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        if int(hi) < int(lo):
            raise ConfigError(f"{pattern}: the range {{{body}}} is empty")
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"{pattern}: expected {{FIRST..LAST}} or {{A,B,...}} in braces")
    return [head + o + rest for o in options for rest in expand_braces(tail)]


# ---------------------------------------------------------------- tar shards


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: key up to the first dot of the file name, then the extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _unsafe(name: str) -> bool:
    parts = name.split("/")
    return name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)


def scan_shard(
    f: IO[bytes], size: int, shard_path: str, shard_name: str, image_key: str | None
) -> tuple[list[ImageItem], list[Failure]]:
    """The samples of one tar shard from its headers (members' data is skipped, not read).

    Keys are `SHARD/SAMPLEKEY.EXT`; `image_key` (an extension such as `png` or
    `rgb.png`) picks the member, else the first of jpg, jpeg, png, webp present.
    """
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    failures: list[Failure] = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member(m.name)
                if not ext:
                    continue  # WebDataset skips members without an extension too
                samples.setdefault(key, {})[ext.lower()] = m
            problem = _bad_end(f, tf.offset, size)
    except (tarfile.TarError, EOFError, OSError) as e:
        problem = str(e)
    if problem:
        last = f" after {len(samples)} samples" if samples else ""
        failures.append(Failure(shard_name + ".tar", f"truncated or corrupt tar{last}: {problem}"))
    items: list[ImageItem] = []
    wanted: tuple[str, ...] = (image_key.lower(),) if image_key else TAR_IMAGE_EXTENSIONS
    for key, members in samples.items():
        found = [e for e in wanted if e in members]
        if not found:
            has = ", ".join("." + e for e in sorted(members))
            want = f".{image_key} member" if image_key else "image member (.jpg .jpeg .png .webp)"
            failures.append(Failure(f"{shard_name}/{key}", f"sample has no {want}; it has {has}"))
            continue
        ext = found[0]
        m = members[ext]
        item_key = f"{shard_name}/{key}.{ext}"
        if _unsafe(m.name):
            failures.append(Failure(item_key, f"unsafe member name {m.name!r} in the tar"))
        elif m.offset_data + m.size > size:
            failures.append(Failure(item_key, "truncated tar: the member's data is cut short"))
        else:
            items.append(ImageItem(key=item_key, path=shard_path, member=m.name))
    return items, failures


def _bad_end(f: IO[bytes], end: int, size: int) -> str | None:
    """Why the bytes after the last member are no end-of-archive marker (tarfile stops
    quietly at a cut header, so a shard cut there would otherwise look complete)."""
    if size - end < 2 * tarfile.BLOCKSIZE:
        return "no end-of-archive marker (cut short?)"
    f.seek(end)
    if f.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
        return "bytes after the last member are not a tar header (cut short or corrupt)"
    return None


# ---------------------------------------------------------------- file lists


def read_file_list(path: str, column: str | None) -> list[str]:
    """The entries of a text list (one per line; blank lines and `#` comments skipped) or a CSV/Parquet column."""
    suffix = os.path.splitext(path)[1].lower()
    table = suffix in (".csv", ".parquet", ".pq")
    if not os.path.isfile(path):
        raise ConfigError(f"--files {path}: no such file")
    if table and column is None:
        raise ConfigError(f"--files {path}: a {suffix[1:]} table needs --column NAME (the column holding the paths)")
    if not table and column is not None:
        raise ConfigError(f"--column {column}: only for a .csv or .parquet --files list")
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if column not in (reader.fieldnames or []):
                    raise ConfigError(f"--column {column}: not a column of {path} (has {reader.fieldnames})")
                return [row[column].strip() for row in reader if (row[column] or "").strip()]
        if table:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError("reading a Parquet list needs pyarrow (pip install pyarrow)") from None
            names = pq.read_schema(path).names
            if column not in names:
                raise ConfigError(f"--column {column}: not a column of {path} (has {names})")
            values = pq.read_table(path, columns=[column]).column(column).to_pylist()
            return [str(v).strip() for v in values if v is not None and str(v).strip()]
        with open(path, encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--files {path}: cannot read: {e}") from None


# ---------------------------------------------------------------- the source


@dataclass(frozen=True, slots=True)
class Discovered:
    items: list[ImageItem]
    failures: list[Failure]


SourceKind = Literal["folder", "prefix", "shards", "list"]


@dataclass(frozen=True, slots=True)
class Source:
    """An input, normalised: `root` is the folder or prefix (None for a brace pattern of shards)."""

    kind: SourceKind
    root: Location | None
    text: str  # as the user gave it, for messages
    shards: tuple[str, ...] = ()  # brace-expanded shard paths/URLs, for kind "shards" given as a pattern
    files: str | None = None
    column: str | None = None
    image_key: str | None = None
    recursive: bool = True
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def remote(self) -> Remote | None:
        """What reads this source's remote paths (None when everything is local)."""
        protocol = self.root.protocol if self.root is not None else None
        if protocol is None and self.shards and is_url(self.shards[0]):
            protocol = self.shards[0].partition("://")[0].lower()
        if protocol in (None, "file") and self.kind != "list":
            return None
        return Remote(protocol or "s3", dict(self.storage_options))

    def discover(self) -> Discovered:
        if self.kind == "list":
            return self._discover_list()
        if self.kind == "shards":
            return self._discover_shards(list(self.shards), common_parent(self.shards))
        assert self.root is not None
        if self.root.is_local:
            items = discover(self.text, recursive=self.recursive)
            if items:
                return Discovered(items, [])
            tars = sorted(str(p) for p in _local_tars(Path(self.text), self.recursive))
        else:
            items, tars = self._list_prefix()
            if items:
                return Discovered(items, [])
        return self._discover_shards(tars, self.root.url if not self.root.is_local else os.fspath(self.text))

    def no_images(self) -> ConfigError:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        if self.kind == "shards":
            return ConfigError(f"no samples with an image found in {self.text}")
        if self.kind == "list":
            return ConfigError(f"no images listed in {self.files}")
        where = "under" if self.recursive else "directly in"
        return ConfigError(f"no images found {where} {self.text} (looked for {exts}, any case)")

    # ---- object-storage prefixes

    def _list_prefix(self) -> tuple[list[ImageItem], list[str]]:
        assert self.root is not None
        remote = self.remote
        assert remote is not None
        url = self.root.url
        protocol, _, rest = url.partition("://")
        try:
            found = remote.fs(url).find(rest, maxdepth=None if self.recursive else 1)
        except FileNotFoundError:
            raise ConfigError(f"input {self.text}: the bucket or prefix does not exist") from None
        except PermissionError:
            raise ConfigError(f"input {self.text}: access denied (check the credentials)") from None
        except Exception as e:
            raise ConfigError(f"input {self.text}: cannot list: {type(e).__name__}: {e}") from None
        keys, tars = [], []
        for p in found:
            rel = p[len(rest) :].lstrip("/")
            ext = os.path.splitext(rel)[1].lower()
            if ext in IMAGE_EXTENSIONS:
                keys.append(rel)
            elif ext == ".tar":
                tars.append(f"{protocol}://{p}")
        items = [ImageItem(key=k, path=f"{url}/{k}") for k in sorted(keys)]
        return items, sorted(tars)

    # ---- tar shards

    def _discover_shards(self, shards: list[str], parent: str) -> Discovered:
        items: list[ImageItem] = []
        failures: list[Failure] = []
        names: dict[str, str] = {}
        remote = self.remote
        for shard in shards:
            name = _shard_name(shard, parent)
            if name in names:
                raise ConfigError(f"shards {names[name]} and {shard} would give the same keys ({name}/...)")
            names[name] = shard
            try:
                size, opened = _open_shard(shard, remote)
            except FileNotFoundError:
                failures.append(Failure(name + ".tar", f"missing shard: {shard} does not exist"))
                continue
            except Exception as e:
                failures.append(Failure(name + ".tar", f"cannot open shard {shard}: {fetch_error(e)}"))
                continue
            with opened as f:
                got, bad = scan_shard(f, size, shard, name, self.image_key)
            items += got
            failures += bad
        return Discovered(items, failures)

    # ---- file lists

    def _discover_list(self) -> Discovered:
        assert self.files is not None
        entries = read_file_list(self.files, self.column)
        base = self.root.url if self.root is not None else os.getcwd()
        base_is_url = self.root is not None and not self.root.is_local
        items: list[ImageItem] = []
        failures: list[Failure] = []
        seen: set[str] = set()
        for entry in entries:
            if is_url(entry):
                path = entry.rstrip("/")
            elif base_is_url:
                path = entry if entry.startswith("/") else f"{base}/{entry}"
            else:
                path = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
            if is_url(path) or base_is_url:
                key = path[len(base) + 1 :] if path.startswith(base + "/") else path.partition("://")[2]
            else:
                rel = os.path.relpath(path, base)
                key = Path(rel).as_posix() if not rel.startswith("..") else Path(path).as_posix().lstrip("/")
            if key in seen:
                failures.append(Failure(key, f"listed more than once in {self.files} (encoded once)"))
                continue
            seen.add(key)
            if not is_url(path) and not os.path.lexists(path):
                failures.append(Failure(key, f"listed in {self.files} but not found: {path}"))
                continue
            items.append(ImageItem(key=key, path=path))
        return Discovered(items, failures)


def _open_shard(shard: str, remote: Remote | None) -> tuple[int, IO[bytes]]:
    if not is_url(shard):
        return os.path.getsize(shard), open(shard, "rb")  # the caller closes it
    assert remote is not None
    fs = remote.fs(shard)
    return with_retries(lambda: fs.size(shard)), remote.open(shard)


def _local_tars(root: Path, recursive: bool) -> Iterator[Path]:
    if not root.is_dir():
        return
    for p in root.rglob("*") if recursive else root.iterdir():
        if p.suffix.lower() == ".tar" and p.is_file():
            yield p


def common_parent(paths: tuple[str, ...] | list[str]) -> str:
    """The folder (or URL prefix) the shard names are taken relative to."""
    if not paths:
        return ""
    parents = {p.rsplit("/", 1)[0] if "/" in p else "" for p in paths}
    return os.path.commonpath(list(parents)) if not any(is_url(p) for p in paths) else min(parents, key=len)


def _shard_name(shard: str, parent: str) -> str:
    """The shard's path relative to `parent`, without `.tar`: the first part of its samples' keys."""
    if not is_url(shard):
        rel = Path(os.path.relpath(shard, parent or ".")).as_posix()
        rel = rel if not rel.startswith("../") else Path(shard).name
    else:
        rel = shard[len(parent) :].lstrip("/") if parent and shard.startswith(parent) else shard.rsplit("/", 1)[-1]
    return rel[: -len(".tar")] if rel.lower().endswith(".tar") else rel


def as_source(
    input: str | os.PathLike[str] | None,
    *,
    files: str | os.PathLike[str] | None = None,
    column: str | None = None,
    image_key: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    recursive: bool = True,
) -> Source:
    """Normalise `--input` (a folder, prefix, shard pattern or .tar) and `--files` into a Source."""
    options = dict(storage_options or {})
    text = os.fspath(input) if input is not None else None
    image_key = image_key.lstrip(".") if image_key else None
    if files is not None:
        root = as_location(text, options) if text is not None else None
        if root is not None and root.is_local and not os.path.isdir(root.url):
            raise ConfigError(f"--input {text}: with --files, --input is the folder relative paths start from")
        return Source("list", root, text or ".", files=os.fspath(files), column=column, recursive=recursive,
                      storage_options=options)  # fmt: skip
    if text is None:
        raise ConfigError("give --input (a folder, s3:// prefix or .tar shards) or --files LIST")
    if column is not None:
        raise ConfigError("--column names the column of a --files table; give --files too")
    if text.lower().endswith(".tar") or _BRACES.search(text):
        shards = expand_braces(text)
        if not all(s.lower().endswith(".tar") for s in shards):
            raise ConfigError(f"--input {text}: a shard pattern must name .tar files")
        if not is_url(text):
            shards = [os.path.expanduser(s) for s in shards]
        return Source("shards", None, text, shards=tuple(shards), image_key=image_key, storage_options=options)
    root = as_location(text, options)
    if root.is_local:
        if not os.path.isdir(root.url):
            raise ConfigError(f"input folder {text!r} does not exist or is not a folder")
        return Source("folder", root, text, image_key=image_key, recursive=recursive)
    return Source("prefix", root, text, image_key=image_key, recursive=recursive, storage_options=options)

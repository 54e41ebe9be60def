"""Where a store lives: a local path or an object-storage URL, normalised once.

    as_location("feats.zarr")                      # local, made absolute
    as_location("file:///data/feats.zarr")         # the same as /data/feats.zarr
    as_location("s3://bucket/prefix/feats.zarr")   # S3 or any S3-compatible server
    as_location("gs://bucket/x.zarr")              # whatever fsspec has a driver for (gcsfs, adlfs, ...)

Every command and API that takes a store turns its argument into a `Location` here and
passes that down; nothing below parses paths again.

Credentials and endpoint come the standard way for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` (read by botocore itself), `AWS_REGION` /
`AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (an `http://` endpoint, as local MinIO or
SeaweedFS servers use, works as is). `storage_options` (the CLI's `--storage-option
key=value`) are fsspec's options for the protocol and win over the environment, e.g.
`endpoint_url`, `key`, `secret`, `anon`, `region_name`.

Every S3 request has a time limit: `FEATSTORE_S3_TIMEOUT` seconds (default 20) to
connect and for each read of the answer, and `FEATSTORE_S3_ATTEMPTS` tries (default 3,
botocore's "standard" retries; s3fs's own retry loop is set to one pass, since it would
multiply them). A server that stops answering (frozen, a dead network path: the TCP
connection stays open, nothing comes back) costs one request about a minute, instead of
botocore's 60 s x s3fs's 5 x botocore's 3 (15 minutes, measured as a silent hang), and
then raises an error `is_timeout` recognises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from featstore.errors import ConfigError, StoreError

Format = Literal["zarr", "hdf5"]
S3_TIMEOUT_ENV, DEFAULT_S3_TIMEOUT_S = "FEATSTORE_S3_TIMEOUT", 20.0
S3_ATTEMPTS_ENV, DEFAULT_S3_ATTEMPTS = "FEATSTORE_S3_ATTEMPTS", 3
ZARR_SUFFIXES = (".zarr",)
HDF5_SUFFIXES = (".h5", ".hdf5")


@dataclass(frozen=True, slots=True)
class Location:
    """A store's place: `url` is an absolute local path (protocol "file") or `PROTOCOL://...`."""

    url: str
    protocol: str = "file"
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def path(self) -> Path:
        """The local path (local locations only)."""
        if not self.is_local:
            raise StoreError(f"{self}: not a local path")
        return Path(self.url)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def format(self) -> Format:
        """The store format, by suffix; HDF5 only on local disk."""
        suffix = os.path.splitext(self.name)[1].lower()
        if suffix in ZARR_SUFFIXES:
            return "zarr"
        if suffix in HDF5_SUFFIXES:
            if not self.is_local:
                raise StoreError(f"{self}: HDF5 stores are local files only; use a .zarr store on object storage")
            return "hdf5"
        raise StoreError(f"{self}: a store must end in .zarr (Zarr v3) or .h5/.hdf5 (HDF5)")

    def sibling(self, suffix: str) -> Location:
        """The location `NAME + suffix` beside this one (local paths only use it)."""
        return Location(self.url + suffix, self.protocol, self.storage_options)

    def exists(self) -> bool:
        if self.is_local:
            return os.path.lexists(self.url)
        from featstore.store._blobs import open_blobs

        return open_blobs(self).read("zarr.json") is not None

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # lets local locations go where paths go (h5py, open)
        return self.path.__fspath__()


def as_location(where: str | os.PathLike[str] | Location, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Normalise a path, `file://` URL or `PROTOCOL://` URL (plus fsspec options) into a Location."""
    if isinstance(where, Location):
        if storage_options:
            return Location(where.url, where.protocol, {**where.storage_options, **storage_options})
        return where
    text = os.fspath(where)
    if not isinstance(text, str):
        raise ConfigError(f"a store location must be text, not {text!r}")
    scheme, sep, rest = text.partition("://")
    if not sep or "/" in scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        return Location(os.path.abspath(os.path.expanduser(text)), "file", dict(storage_options or {}))
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return Location(os.path.abspath(rest if rest.startswith("/") else "/" + rest), "file", {})
    rest = rest.rstrip("/")
    if not rest or rest.startswith("/"):
        raise ConfigError(f"{text}: expected {scheme}://BUCKET/PATH")
    if scheme in ("s3", "s3a"):
        scheme = "s3"
        bucket = rest.split("/", 1)[0]
        if not _dns_bucket(bucket):
            raise ConfigError(f"{text}: {bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')")
    return Location(f"{scheme}://{rest}", scheme, dict(storage_options or {}))


def _dns_bucket(name: str) -> bool:
    ok = set("abcdefghijklmnopqrstuvwxyz0123456789.-")
    return 3 <= len(name) <= 63 and set(name) <= ok and name[0].isalnum() and name[-1].isalnum()


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings (the CLI's --storage-option) into a dict; values parsed as JSON when they are JSON."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--storage-option {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def fsspec_options(location: Location) -> dict[str, Any]:
    """The fsspec filesystem options for a remote location: the environment, then `storage_options`."""
    options: dict[str, Any] = {}
    if location.protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["client_kwargs"] = {"region_name": region}
        # Requests as s3fs makes them by default, but with no retries of a refused
        # credential (a wrong key should be one error now, not a minute of backoff) and
        # with a time limit (see the module docstring).
        timeout, attempts = s3_limits()
        options["config_kwargs"] = {
            "retries": {"total_max_attempts": attempts, "mode": "standard"},
            "connect_timeout": timeout,
            "read_timeout": timeout,
        }
    # Listings must be fresh: a reader lists the commit records of other processes.
    options["use_listings_cache"] = False
    given = dict(location.storage_options)
    if "region_name" in given and location.protocol == "s3":
        options.setdefault("client_kwargs", {})["region_name"] = given.pop("region_name")
    options.update(given)
    return options


def remote_fs(protocol: str, options: Mapping[str, Any]) -> Any:
    """The fsspec filesystem for `protocol` with `options` (see `fsspec_options`), its
    requests bounded in time (`limit_retries`)."""
    import fsspec

    return limit_retries(fsspec.filesystem(protocol, **options))


def limit_retries(fs: Any) -> Any:
    """Bound an s3fs filesystem's requests in time, once per (cached) instance.

    s3fs retries each call 5 times around botocore's own tries, and a read once more
    around that: 75 requests of silence; one pass leaves botocore's tries as the budget.
    botocore sends uploads with `Expect: 100-continue`, and aiohttp waits for the "100
    Continue" with no time limit at all (a PUT to a frozen server hung for as long as it
    was frozen, while GETs timed out): the header goes, the body is sent at once.
    """
    if not type(fs).__module__.startswith("s3fs") or getattr(fs, "_featstore_bounded", False):
        return fs
    fs.retries = 1
    try:
        fs.connect()  # makes the botocore client (no request), so that its events can be set
        fs.s3.meta.events.register("before-send.s3", _no_expect_continue)
    except Exception:  # no client yet (bad options): the first request says why
        pass
    else:
        fs._featstore_bounded = True
    return fs


def _no_expect_continue(request: Any, **_kw: Any) -> None:
    if "Expect" in request.headers:
        del request.headers["Expect"]


def s3_limits() -> tuple[float, int]:
    """(seconds per request read or connect, tries per request) from the environment."""
    try:
        timeout = float(os.environ.get(S3_TIMEOUT_ENV) or DEFAULT_S3_TIMEOUT_S)
        attempts = int(os.environ.get(S3_ATTEMPTS_ENV) or DEFAULT_S3_ATTEMPTS)
    except ValueError:
        raise ConfigError(f"{S3_TIMEOUT_ENV} must be seconds and {S3_ATTEMPTS_ENV} a whole number") from None
    if timeout <= 0 or attempts < 1:
        raise ConfigError(f"{S3_TIMEOUT_ENV} must be over 0 and {S3_ATTEMPTS_ENV} at least 1")
    return timeout, attempts


def is_timeout(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a request that got no answer in time: botocore's
    Read/ConnectTimeoutError, aiohttp's, asyncio's, fsspec's FSTimeoutError."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError) or "Timeout" in type(cur).__name__:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def no_answer(where: object) -> str:
    """The one line for object storage that did not answer."""
    timeout, attempts = s3_limits()
    return (
        f"{where}: object storage did not answer ({attempts} tries of {timeout:g} s; "
        f"{S3_TIMEOUT_ENV} and {S3_ATTEMPTS_ENV} set the limits); work committed before this point is kept"
    )

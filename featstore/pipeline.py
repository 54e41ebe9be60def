"""`build`: the public entry that turns images (a folder, or any input of
`featstore.sources`: an object-storage prefix, tar shards, a file list) into per-image
files and/or a store.

It lists the input's images (`Source.discover`), checks the options and outputs, loads
the model (`featstore.loading`) into a `PatchEncoder`, opens the writers
(`featstore.npy`, `featstore.store.writer`), and hands the images still to do to the
reader (`featstore.reader`) and the runner (`featstore.runner`): a single process as
one work unit; one process of a distributed build (torchrun, SLURM, `--shard`; see
`featstore.launch`) unit by unit, as its `featstore.distributed.Scheduler` takes them.
`build(..., encoder=...)` takes any `ModelEncoder` instead of loading a model: the seam
for tests and benchmarks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from featstore.batches import EncodingInfo, Failure, Writer
from featstore.distributed import Scheduler, block, listing_plan
from featstore.encoder import Encoded, Encoder, PatchEncoder
from featstore.errors import BuildInterrupted, ConfigError
from featstore.imagecheck import DEFAULT_MAX_IMAGE_BYTES
from featstore.images import DEFAULT_MAX_PIXELS, RESIZERS, Preprocess, output_collisions, unusable_names
from featstore.launch import Share, cuda_device_for, detect_share, process_cpus, workers_for
from featstore.loading import LoadedModel, check_preset_options, load_model
from featstore.npy import FAILURES_FILE, NpyWriter
from featstore.outputs import check_outputs
from featstore.reader import ImageReader
from featstore.runner import ProgressFn, RunResult, StageTimes, output_error, run
from featstore.signals import StopRequest
from featstore.sources import Source, as_source
from featstore.store.guard import StartGuard
from featstore.store.location import as_location
from featstore.store.plans import DEFAULT_UNIT_IMAGES
from featstore.store.units import UnitStore

__all__ = ["BuildOptions", "BuildResult", "ModelEncoder", "build"]


class ModelEncoder(Encoder, Protocol):
    """An encoder `build` can drive: the runner's `Encoder` plus what the outputs record."""

    @property
    def info(self) -> EncodingInfo:
        """How the features are made (model, size, grid, channels, dtype, preprocessing)."""
        ...

    @property
    def preprocess(self) -> Preprocess:
        """How the reader turns an image into the encoder's input (resize, premultiply)."""
        ...


# ---------------------------------------------------------------- options and result


@dataclass(frozen=True, slots=True)
class BuildOptions:
    model: str | None = None  # optional with a preset (then it replaces only the weights)
    size: int | None = None
    device: str = "auto"
    precision: str | None = None  # fp32 | fp16 | bf16; None: fp16 on CUDA, fp32 on CPU
    batch_size: int | None = None
    workers: int | None = None
    clip_output: str = "raw"
    overwrite: bool = False
    recursive: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # per image file, refused before reading (memory bound)
    resizer: str = "auto"  # auto | pillow (exact) | torch (Preprocess.resizer); auto appends keep a store's own
    compile: bool = False  # torch.compile the model (CUDA: worth it for long runs)
    layers: tuple[int, ...] | None = None  # hidden_states indices; None: the family's standard output
    norm: str | None = None  # model | none | plain; None: what the family's standard output applies
    preset: str | None = None  # a preset registry entry (trellis, trellis2)
    embedding: bool | None = None  # pooled embedding beside the maps; None: on when the model has one


@dataclass(slots=True)
class BuildResult:
    total: int = 0
    encoded: int = 0
    skipped: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # encoding: from the first batch asked for to the outputs committed
    startup_seconds: float = 0.0  # before that: finding images, loading the model, opening outputs
    stages: StageTimes = field(default_factory=StageTimes)
    info: EncodingInfo | None = None
    share: Share = field(default_factory=Share)
    units: int = 0  # distributed: units this process took
    stolen: int = 0  # of them, from other processes' blocks
    units_finished: int = 0  # distributed with a store: units of the plan finished ...
    units_planned: int = 0  # ... of this many
    complete: bool | None = None  # distributed with a store: whether the store is finalized
    wait_seconds: float = 0.0  # distributed: waiting for units other processes held
    finalize_seconds: float = 0.0  # distributed with a store: checking for and doing the finalize
    lease_requests: int = 0  # distributed with a store: lease operations (creates, reads, renewals, ...)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        line = (
            f"encoded {self.encoded}, skipped {self.skipped}, failed {self.failed} "
            f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s); "
            f"start-up {self.startup_seconds:.1f} s"
        )
        if not self.share.distributed:
            return line
        line = f"{self.share.describe()}: {line}; took {self.units} units ({self.stolen} from others)"
        if self.complete:
            return line + "; the store is complete"
        if self.complete is False:
            return line + (
                f"; {self.units_finished} of {self.units_planned} units finished so far "
                "(the others are being written, or re-run the same command)"
            )
        return line


# ---------------------------------------------------------------- device defaults


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    return dev


def default_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "fp32"


def default_batch_size(device: torch.device, hidden_dim: int) -> int:
    if device.type == "cpu":
        return 16
    return 256 if hidden_dim <= 768 else 128


def default_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cpu":
        return 1  # the model needs the cores; decode at CPU model speed is cheap
    return max(1, min(cpus - 1, 16))


# ---------------------------------------------------------------- the model behind the seam


def encoding_info(loaded: LoadedModel, encoder: PatchEncoder, model_name: str) -> EncodingInfo:
    return encoder.info(model_name, loaded.source)


class _LoadedEncoder:
    """A `PatchEncoder` with the `EncodingInfo` of the model it was built from."""

    def __init__(self, encoder: PatchEncoder, info: EncodingInfo, preprocess: Preprocess) -> None:
        self.patch_encoder, self.info, self.device = encoder, info, encoder.device
        self.embedding_dim, self.preprocess = encoder.embedding_dim, preprocess

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.patch_encoder.encode(pixels)

    def encode_batch(self, pixels: torch.Tensor) -> Encoded:
        return self.patch_encoder.encode_batch(pixels)


def model_encoder(
    options: BuildOptions, loaded: LoadedModel | None = None, *, embedding: bool | None = None
) -> ModelEncoder:
    """Load `options.model` (or use `loaded`) into an encoder for `build`. `embedding`:
    keep the pooled embedding (None: when the model offers one)."""
    device = resolve_device(options.device)
    precision = options.precision or default_precision(device)
    if precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--precision {precision!r}: expected fp32, fp16 or bf16")
    if loaded is None:
        loaded = load_model(options.model, clip_output=options.clip_output, preset=options.preset)
    check_preset_options(loaded.spec, size=options.size, layers=options.layers, norm=options.norm)
    loaded = _with_resizer(loaded, options.resizer)
    size = options.size or loaded.spec.default_size
    loaded.spec.grid(size)  # refuses sizes that are not a multiple of the patch
    encoder = PatchEncoder(
        loaded,
        size=size,
        device=device,
        precision=precision,
        clip_output=options.clip_output,
        compile=options.compile,
        layers=options.layers,
        norm=options.norm,
        embedding=embedding,
    )
    info = encoding_info(loaded, encoder, options.model or loaded.spec.name)
    return _LoadedEncoder(encoder, info, loaded.spec.preprocess)


def _with_resizer(loaded: LoadedModel, resizer: str) -> LoadedModel:
    """`loaded` whose preprocessing resizes with `resizer` (what the store then records);
    "auto" leaves presets that torch cannot stand in for (TRELLIS's lines) on Pillow's."""
    pre = loaded.spec.preprocess
    if pre.resizer == resizer or (resizer == "auto" and not pre.torch_allowed()):
        return loaded
    try:
        new = replace(pre, resizer=resizer)
    except ValueError:
        raise ConfigError(
            f"--resizer {resizer}: {loaded.spec.name}'s preprocessing ({pre.describe_premultiply()}, "
            f"{pre.resample}) is Pillow's only; leave --resizer out"
        ) from None
    return replace(loaded, spec=replace(loaded.spec, preprocess=new))


# ---------------------------------------------------------------- checks before the model loads


def _check_options(options: BuildOptions) -> None:
    if options.clip_output not in ("raw", "projected"):
        raise ConfigError(f"--clip-output {options.clip_output!r}: expected raw or projected")
    if options.precision is not None and options.precision not in ("fp32", "fp16", "bf16"):
        raise ConfigError(f"--precision {options.precision!r}: expected fp32, fp16 or bf16")
    if options.resizer not in RESIZERS:
        raise ConfigError(f"--resizer {options.resizer!r}: expected {', '.join(RESIZERS)}")
    resolve_device(options.device)


# ---------------------------------------------------------------- distributed builds


def _distributed_options(options: BuildOptions, share: Share, store: Any) -> BuildOptions:
    """Checks and per-process defaults of a distributed build (see `featstore.launch`)."""
    if store is not None and str(store).lower().endswith((".h5", ".hdf5")):
        raise ConfigError(
            "an HDF5 store is one local file written by one process: write a .zarr store from several processes "
            "(`featstore convert` makes an .h5 of it afterwards)"
        )
    if options.overwrite:
        raise ConfigError(
            f"--overwrite in a distributed build ({share.describe()}): each process would delete the others' "
            "work; delete the outputs first, or run once with --overwrite from one process without --shard"
        )
    if options.device in ("auto", "cuda") and torch.cuda.is_available():
        return replace(options, device=cuda_device_for(share, torch.cuda.device_count()))
    if "OMP_NUM_THREADS" not in os.environ:  # on CPU; torchrun sets it, srun and --shard do not
        torch.set_num_threads(process_cpus(share))
    return options


def _with_expected_total(update: ProgressFn, scheduler: Scheduler) -> ProgressFn:
    def progress(run: RunResult) -> None:
        run.total = scheduler.expected()  # grows when the process takes others' units
        update(run)

    return progress


def _close(writers: list[Writer], unit_store: UnitStore | None) -> None:
    for w in writers:
        w.close()
    if unit_store is not None:
        unit_store.close()


def _failures_file(share: Share) -> str:
    if not share.distributed:
        return FAILURES_FILE
    stem = FAILURES_FILE.removesuffix(".jsonl")
    return f"{stem}.{share.rank}-of-{share.world}.jsonl"


def _scheduler(
    share: Share,
    items: list[Any],
    failures: list[Failure],
    unit_store: UnitStore | None,
    writers: list[Writer],
    stop: StopRequest,
    unit_images: int | None,
) -> Scheduler:
    """The plan of this build (the store's, or the listing's without one) and this process's scheduler."""
    keys = [it.key for it in items]
    size = unit_images or DEFAULT_UNIT_IMAGES
    if unit_store is None:
        return Scheduler(listing_plan(keys, size), items, share, store=None, writers=writers, stop=stop)
    plan = unit_store.plan(keys, failures, size)
    if plan.keys is None:
        planned = items
    else:
        by_key = {it.key: it for it in items}
        planned = [by_key[k] for k in plan.keys]
    return Scheduler(plan, planned, share, store=unit_store, writers=writers, stop=stop)


# ---------------------------------------------------------------- build


def build(
    input_dir: str | os.PathLike[str] | Source,
    options: BuildOptions,
    *,
    npy_dir: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | None = None,
    save_meta: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    loaded: LoadedModel | None = None,
    encoder: ModelEncoder | None = None,
    log: Callable[[str], None] | None = None,
    share: Share | None = None,
    unit_images: int | None = None,
) -> BuildResult:
    """Encode every image of `input_dir` (a folder, or any `featstore.sources.Source`)
    into per-image files and/or a store.

    Images whose outputs exist are skipped. `encoder` replaces loading `options.model`
    (`loaded` reuses a loaded model). `progress_factory(total)` returns a context manager
    whose value is called with the runner's `RunResult` after each batch and after the
    commit (the CLI passes a progress bar); `log` gets one-line status messages.

    SIGINT, SIGTERM and SIGHUP (when called from the main thread) stop the build between
    batches: what was encoded is committed, then `BuildInterrupted` is raised.

    `share`: this process's part of a distributed build (default: from `--shard`-less
    launcher variables, see `featstore.launch`); a distributed build cuts the work into
    units of `unit_images` (see `featstore.distributed`).
    """
    started = time.perf_counter()
    say = log or (lambda _msg: None)
    if npy_dir is None and store is None:
        raise ConfigError("nothing to write: give --npy-dir, --store or both")
    _check_options(options)
    where = as_location(store) if store is not None else None
    check_outputs(where, Path(npy_dir) if npy_dir is not None else None)  # before the model loads
    share = share if share is not None else detect_share()
    if not share.distributed and store is not None and not options.overwrite:
        from featstore.store.writer import has_open_plan

        if has_open_plan(store):  # finish the distributed build's units, in their order
            share = Share(launcher="resume")
    if share.distributed:
        options = _distributed_options(options, share, store)
    source = input_dir if isinstance(input_dir, Source) else as_source(input_dir, recursive=options.recursive)
    found = source.discover()  # missing shards, samples without an image, ...: failures, by name
    items = found.items
    if not items:
        if found.failures:
            first = found.failures[0]
            raise ConfigError(f"{source.no_images()}; {len(found.failures)} failed, first {first.key}: {first.reason}")
        raise source.no_images()
    if store is not None:
        from featstore.store.writer import refuse_busy_store

        refuse_busy_store(store, leases=not share.distributed)  # before the model loads
        if options.resizer == "auto" and not options.overwrite:  # appending keeps the store's resizer
            from featstore.store.writer import recorded_resizer

            options = replace(options, resizer=recorded_resizer(store) or "auto")
    # Held from before the model loads to the end: a second build of this store started at
    # the same instant on this machine is refused now, not once its model has loaded.
    guard = StartGuard(where) if where is not None and not share.distributed else nullcontext()
    stop = StopRequest()
    with guard, stop.handling_signals():
        if encoder is None:
            say(f"loading model {options.model} ...")
            # stores keep the pooled embedding by default; per-image files only when asked (--embedding)
            keep = options.embedding if store is not None else (options.embedding or False)
            encoder = model_encoder(options, loaded, embedding=keep)
        info = encoder.info
        if options.size is not None and options.size != info.size:
            raise ConfigError(f"--size {options.size} disagrees with the encoder's size {info.size}")
        if stop.requested:  # during the model load: nothing opened yet
            raise BuildInterrupted(stop.signum or 0, 0)

        writers: list[Writer] = []
        unit_store: UnitStore | None = None
        try:
            if store is not None and share.distributed:
                from featstore import __version__
                from featstore.store.writer import open_unit_store

                unit_store = open_unit_store(store, info, featstore_version=__version__)
                writers.append(unit_store.writer_stage())
            elif store is not None:
                from featstore import __version__
                from featstore.store.writer import open_store_writer

                writers.append(
                    open_store_writer(store, info, overwrite=options.overwrite, featstore_version=__version__)
                )
            if npy_dir is not None:
                # per-image files keep the original layout: `_embedding.npy` only when asked for
                writers.append(
                    NpyWriter(
                        Path(npy_dir),
                        info,
                        save_meta=save_meta,
                        overwrite=options.overwrite,
                        embedding=options.embedding is True,
                        failures_file=_failures_file(share),
                    )
                )
        except OSError as e:
            _close(writers, unit_store)
            raise output_error(e) from None
        except BaseException:
            _close(writers, unit_store)
            raise

        bad_names = unusable_names(items)  # not UTF-8, backslash: refused per file
        failures: list[Failure] = found.failures + list(bad_names.values())
        items = [it for it in items if it.key not in bad_names]
        if npy_dir is not None:  # a.png and a.jpg would both write a.npy: refuse the later one
            clashes = output_collisions(items)
            failures += [
                Failure(k, f"output name collides with {first!r} (both write the same .npy)")
                for k, first in clashes.items()
            ]
            items = [it for it in items if it.key not in clashes]

        keys = [it.key for it in items]
        scheduler = None
        if share.distributed:
            try:
                scheduler = _scheduler(share, items, failures, unit_store, writers, stop, unit_images)
            except BaseException:
                _close(writers, unit_store)
                raise
            own = block(share, scheduler.plan.units)
            todo = [it for u in own for it in scheduler.items[scheduler.plan.unit_slice(u)]]  # the first estimate
        else:
            pending: set[str] = set()
            for w in writers:
                pending |= w.pending(keys)
            todo = [it for it in items if it.key in pending]  # one work unit: everything still to do

        device = encoder.device
        reader = ImageReader(
            size=info.size,
            grid=info.grid,
            batch_size=options.batch_size or default_batch_size(device, info.hidden_dim),
            workers=(
                options.workers
                if options.workers is not None
                else workers_for(share, device.type == "cuda")
                if share.distributed
                else default_workers(device)
            ),
            pin=device.type == "cuda",
            max_pixels=options.max_pixels,
            max_bytes=options.max_image_bytes,
            preprocess=encoder.preprocess,
            remote=source.remote,
        )
        startup = time.perf_counter() - started
        progress_ctx = progress_factory(len(todo)) if progress_factory else nullcontext(None)
        try:
            with progress_ctx as update:
                progress: ProgressFn | None = update
                if scheduler is not None and update is not None:
                    progress = _with_expected_total(update, scheduler)
                ran: RunResult = run(
                    scheduler.stream(reader) if scheduler is not None else reader.batches(todo),
                    encoder,
                    writers,
                    total=len(todo),
                    failures=failures,
                    progress=progress,
                    stop=stop,
                )
        except OSError as e:
            if unit_store is not None:
                unit_store.close()
            raise output_error(e) from None
        except BaseException:
            if unit_store is not None:
                unit_store.close()
            raise

    result = BuildResult(
        total=len(items) + len(failures),
        encoded=ran.encoded,
        skipped=len(items) - len(todo),
        failures=ran.failures,
        seconds=ran.seconds,
        startup_seconds=startup,
        stages=ran.stages,
        info=info,
        share=share,
    )
    if scheduler is not None:
        stats = scheduler.stats
        result.skipped = stats.planned - stats.images
        result.units, result.stolen, result.wait_seconds = stats.units, stats.stolen, stats.waited_s
        if unit_store is not None:
            t0 = time.perf_counter()
            try:
                result.complete = unit_store.finalize(scheduler.plan) if stop.signum is None else False
                result.units_finished, result.units_planned = unit_store.complete(scheduler.plan)
                result.lease_requests = unit_store.leases.requests
            finally:
                unit_store.close()
            result.finalize_seconds = time.perf_counter() - t0
    if stop.signum is not None:
        raise BuildInterrupted(stop.signum, result.encoded, result)
    return result

"""`build`: the public entry that turns images (a folder, or any input of
`featstore.sources`: an object-storage prefix, tar shards, a file list) into per-image
files and/or a store, for one model or several at once.

`build` is a short composition; to follow one image from the listing to its rows:

1. `plan_build` (`featstore.buildplan`): every option and output checked, this
   process's share of the work (`featstore.launch`), the input listed
   (`Source.discover`). No model yet, nothing created.
2. `load_encoders`: each model (`featstore.loading`) as a `PatchEncoder` on the device.
3. `open_outputs`: each model's writers (`featstore.npy`, `featstore.store.writer`).
4. The work: `single_process_work` (one unit: every image some model's outputs lack)
   or `distributed_work` (this process's units of the store's plan, as its
   `featstore.distributed.Scheduler` takes them). The only place the two differ.
5. The reader (`featstore.reader`) decodes each image once and prepares it for every
   model; the runner (`featstore.runner.run_lanes`) encodes each model's rows and feeds
   its writers, which commit as they go.

`build(..., encoder=...)` takes any `ModelEncoder` instead of loading a model: the seam
for tests and benchmarks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from featstore import memory
from featstore.batches import EncodingInfo, Failure, ImageBatch, UnitMark, Writer
from featstore.buildplan import BuildPlan, Target, plan_build
from featstore.cputhreads import ModelThreads
from featstore.distributed import ModelUnits, Scheduler
from featstore.encoder import Encoded, Encoder, PatchEncoder
from featstore.errors import BuildInterrupted, ConfigError
from featstore.heap import keep_freed_memory
from featstore.images import Preprocess
from featstore.launch import Share, workers_for
from featstore.loading import LoadedModel, check_preset_options, load_model
from featstore.npy import FAILURES_FILE, NpyWriter
from featstore.options import (
    BuildOptions,
    default_batch_size,
    default_precision,
    default_workers,
    resolve_device,
)
from featstore.reader import ImageReader
from featstore.runner import Lane, ProgressFn, RunResult, StageTimes, output_error, run_lanes
from featstore.samples import InputSpec
from featstore.signals import StopRequest
from featstore.sources import Source
from featstore.store.location import Location
from featstore.store.plans import DEFAULT_UNIT_IMAGES
from featstore.store.units import UnitStore

__all__ = [
    "BuildOptions",
    "BuildResult",
    "ModelEncoder",
    "ModelResult",
    "Target",
    "build",
    "default_batch_size",
    "default_precision",
    "default_workers",
    "model_encoder",
    "resolve_device",
]


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


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class ModelResult:
    """One model's part of a build of several."""

    name: str
    outputs: str  # its store and/or per-image folder
    encoded: int = 0
    skipped: int = 0  # images its outputs had already
    failures: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        failed = len(self.failures)
        return f"{self.name} -> {self.outputs}: encoded {self.encoded}, skipped {self.skipped}, failed {failed}"


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
    models: list[ModelResult] = field(default_factory=list)  # a build of several models: each one's part

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line (a build of several models: then one more per model)."""
        return self._line() + "".join("\n  " + m.summary() for m in self.models)

    def _line(self) -> str:
        done = (
            f"decoded {self.encoded} once for {len(self.models)} models" if self.models else f"encoded {self.encoded}"
        )
        line = (
            f"{done}, skipped {self.skipped}, failed {self.failed} "
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


# ---------------------------------------------------------------- the models and their outputs


def load_encoders(plan: BuildPlan, say: Callable[[str], None], stop: StopRequest) -> list[ModelEncoder]:
    """Every model of the plan on its device (all of them at once), checked against the
    device's memory when there are several."""
    encoders: list[ModelEncoder] = []
    for t, where in zip(plan.targets, plan.stores, strict=True):
        encoder = t.encoder
        if encoder is None:
            say(f"loading model {t.name} ...")
            # stores keep the pooled embedding by default; per-image files only when asked (--embedding)
            keep = t.options.embedding if where is not None else (t.options.embedding or False)
            try:
                encoder = model_encoder(t.options, t.loaded, embedding=keep)
            except torch.OutOfMemoryError:
                raise ConfigError(memory.no_room_to_load(t.name, [e.info.model for e in encoders])) from None
        size = encoder.info.size
        if t.options.size is not None and t.options.size != size:
            raise ConfigError(f"--size {t.options.size} disagrees with the encoder's size {size}")
        encoders.append(encoder)
        if stop.requested:  # during a model load: nothing opened yet
            raise BuildInterrupted(stop.signum or 0, 0)
    if len(encoders) > 1:
        memory.check_fits(encoders, plan.options.batch_size)
    return encoders


@dataclass(slots=True)
class _Outputs:
    """One model's writers (in the order they are fed), and its store's handle in a distributed build."""

    writers: list[Writer] = field(default_factory=list)
    unit_store: UnitStore | None = None

    def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.unit_store is not None:
            self.unit_store.close()


def open_outputs(plan: BuildPlan, encoders: list[ModelEncoder], save_meta: bool) -> list[_Outputs]:
    """Each model's writers, created or opened now (everything was checked before)."""
    from featstore import __version__
    from featstore.store.writer import open_store_writer, open_unit_store

    opened: list[_Outputs] = []
    try:
        for t, where, npy, encoder in zip(plan.targets, plan.stores, plan.npy_dirs, encoders, strict=True):
            out = _Outputs()
            opened.append(out)
            if where is not None and plan.share.distributed:
                out.unit_store = open_unit_store(where, encoder.info, featstore_version=__version__)
                out.writers.append(out.unit_store.writer_stage())
            elif where is not None:
                writer = open_store_writer(
                    where, encoder.info, overwrite=plan.options.overwrite, featstore_version=__version__
                )
                out.writers.append(writer)
            if npy is not None:
                # per-image files keep the original layout: `_embedding.npy` only when asked for
                out.writers.append(
                    NpyWriter(
                        npy,
                        encoder.info,
                        save_meta=save_meta,
                        overwrite=plan.options.overwrite,
                        embedding=t.options.embedding is True,
                        failures_file=_failures_file(plan.share),
                    )
                )
    except BaseException as e:
        _close_all(opened)
        if isinstance(e, OSError):
            raise output_error(e) from None
        raise
    return opened


def _close_all(outputs: list[_Outputs]) -> None:
    for out in outputs:
        with suppress(Exception):  # closing after a failure: the failure is what the user needs to see
            out.close()


def _failures_file(share: Share) -> str:
    if not share.distributed:
        return FAILURES_FILE
    stem = FAILURES_FILE.removesuffix(".jsonl")
    return f"{stem}.{share.rank}-of-{share.world}.jsonl"


# ---------------------------------------------------------------- the work: all of it, or unit by unit


@dataclass(slots=True)
class _Work:
    """What the runner is handed: each model's lane and the stream of batches."""

    lanes: list[Lane]
    total: int  # images to decode (a distributed process's first estimate)
    stream: Callable[[ImageReader], Iterable[ImageBatch | UnitMark]]
    scheduler: Scheduler | None = None
    skipped: list[int] = field(default_factory=list)  # per model, images its outputs had (one process)


def single_process_work(plan: BuildPlan, encoders: list[ModelEncoder], outputs: list[_Outputs]) -> _Work:
    """One work unit: every image some model's outputs still lack."""
    needs, skipped = [], []
    for m, out in enumerate(outputs):
        keys = plan.keys_for(m)
        pending: set[str] = set()
        for w in out.writers:
            pending |= w.pending(keys)
        needs.append(pending)
        skipped.append(len(keys) - len(pending))
    every = set().union(*needs)
    todo = [it for it in plan.items if it.key in every]
    one = len(outputs) == 1
    lanes = [
        Lane(enc, out.writers, None if one else need, plan.failures_for(m))
        for m, (enc, out, need) in enumerate(zip(encoders, outputs, needs, strict=True))
    ]
    return _Work(lanes, len(todo), lambda reader: reader.batches(todo), skipped=skipped)


def distributed_work(
    plan: BuildPlan, encoders: list[ModelEncoder], outputs: list[_Outputs], stop: StopRequest, unit_images: int | None
) -> _Work:
    """This process's units of the build's plan, as the `Scheduler` takes them."""
    models = [ModelUnits(out.unit_store, out.writers, excluded=set(plan.excluded[m])) for m, out in enumerate(outputs)]
    lanes = [  # the scheduler grows each model's needs unit by unit
        Lane(enc, out.writers, model.needs, plan.failures_for(m))
        for m, (enc, out, model) in enumerate(zip(encoders, outputs, models, strict=True))
    ]
    size = unit_images or DEFAULT_UNIT_IMAGES
    scheduler = Scheduler.for_build(plan.items, plan.failures, models, plan.share, stop, size)
    return _Work(lanes, scheduler.expected(), scheduler.stream, scheduler=scheduler)


def _reader(plan: BuildPlan, encoders: list[ModelEncoder]) -> ImageReader:
    options, device, first = plan.options, encoders[0].device, encoders[0].info
    if options.workers is not None:
        workers = options.workers
    elif plan.share.distributed:
        workers = workers_for(plan.share, device.type == "cuda")
    else:
        workers = default_workers(device)
    return ImageReader(
        size=first.size,
        grid=first.grid,
        batch_size=options.batch_size or min(default_batch_size(device, e.info.hidden_dim) for e in encoders),
        workers=workers,
        pin=device.type == "cuda",
        max_pixels=options.max_pixels,
        max_bytes=options.max_image_bytes,
        preprocess=encoders[0].preprocess,
        remote=plan.source.remote,
        also=tuple(InputSpec(e.info.size, e.info.grid, e.preprocess) for e in encoders[1:]),
    )


# ---------------------------------------------------------------- build


def build(
    input_dir: str | os.PathLike[str] | Source,
    options: BuildOptions,
    *,
    npy_dir: str | os.PathLike[str] | None = None,
    store: str | os.PathLike[str] | Location | None = None,
    save_meta: bool = False,
    progress_factory: Callable[[int], Any] | None = None,
    loaded: LoadedModel | None = None,
    encoder: ModelEncoder | None = None,
    log: Callable[[str], None] | None = None,
    share: Share | None = None,
    unit_images: int | None = None,
    also: Sequence[Target] = (),
) -> BuildResult:
    """Encode every image of `input_dir` (a folder, or any `featstore.sources.Source`)
    into per-image files and/or a store; `also`: more models, each into its own outputs,
    from the same listing, read and decode of each image.

    Images whose outputs exist are skipped (per model). `encoder` replaces loading
    `options.model` (`loaded` reuses a loaded model). `progress_factory(total)` returns a
    context manager whose value is called with the runner's `RunResult` after each batch
    and after the commit (the CLI passes a progress bar); `log` gets one-line status messages.

    SIGINT, SIGTERM and SIGHUP (when called from the main thread) stop the build between
    batches: what was encoded is committed, then `BuildInterrupted` is raised.

    `share`: this process's part of a distributed build (default: from `--shard`-less
    launcher variables, see `featstore.launch`); a distributed build cuts the work into
    units of `unit_images` (see `featstore.distributed`).

    The calling process keeps freed memory from here on, as decode workers do
    (`featstore.heap`): each batch's tensors reuse the last one's pages.
    """
    started = time.perf_counter()
    keep_freed_memory()
    plan = plan_build(input_dir, [Target(options, store, npy_dir, encoder, loaded), *also], share)
    stop = StopRequest()
    with plan.guards(), stop.handling_signals():
        encoders = load_encoders(plan, log or (lambda _msg: None), stop)
        outputs = open_outputs(plan, encoders, save_meta)
        try:
            if plan.share.distributed:  # the one place where the two kinds of build differ
                work = distributed_work(plan, encoders, outputs, stop, unit_images)
            else:
                work = single_process_work(plan, encoders, outputs)
            reader = _reader(plan, encoders)
            on_cpu = not plan.share.distributed and all(e.device.type == "cpu" for e in encoders)
            threads = ModelThreads(reader.workers, applies=on_cpu)
            startup = time.perf_counter() - started
            with progress_factory(work.total) if progress_factory else nullcontext(None) as update:
                if work.scheduler is not None and update is not None:
                    update = _with_expected_total(update, work.scheduler)
                progress = threads.observe if update is None else _both(update, threads.observe)
                try:
                    ran = run_lanes(work.stream(reader), work.lanes, total=work.total, progress=progress, stop=stop)
                finally:
                    threads.restore()
        except OSError as e:
            _close_stores(outputs)
            raise output_error(e) from None
        except BaseException:
            _close_stores(outputs)
            raise
    result = _result(plan, encoders, work, ran, startup)
    if work.scheduler is not None:
        _finish_distributed(result, work.scheduler, outputs, stop)
    if stop.signum is not None:
        raise BuildInterrupted(stop.signum, result.encoded, result)
    return result


def _close_stores(outputs: list[_Outputs]) -> None:
    """After a failed run (whose writers the runner closed): the distributed stores' handles."""
    for out in outputs:
        if out.unit_store is not None:
            out.unit_store.close()


def _both(first: ProgressFn, second: ProgressFn) -> ProgressFn:
    def progress(run: RunResult) -> None:
        first(run)
        second(run)

    return progress


def _with_expected_total(update: ProgressFn, scheduler: Scheduler) -> ProgressFn:
    def progress(run: RunResult) -> None:
        run.total = scheduler.expected()  # grows when the process takes others' units
        update(run)

    return progress


def _result(plan: BuildPlan, encoders: list[ModelEncoder], work: _Work, ran: RunResult, startup: float) -> BuildResult:
    models = [
        ModelResult(
            name=encoder.info.model,
            outputs=", ".join(str(o) for o in (where, npy) if o is not None),
            encoded=lane.encoded,
            skipped=work.skipped[m] if work.skipped else 0,
            failures=lane.failures,
        )
        for m, (encoder, lane, where, npy) in enumerate(
            zip(encoders, ran.lanes, plan.stores, plan.npy_dirs, strict=True)
        )
    ]
    one = len(models) == 1
    return BuildResult(
        total=plan.listed,
        encoded=ran.encoded,
        skipped=models[0].skipped if one else len(plan.items) - work.total,
        failures=ran.failures,
        seconds=ran.seconds,
        startup_seconds=startup,
        stages=ran.stages,
        info=encoders[0].info,
        share=plan.share,
        models=[] if one else models,
    )


def _finish_distributed(result: BuildResult, scheduler: Scheduler, outputs: list[_Outputs], stop: StopRequest) -> None:
    stats = scheduler.stats
    result.skipped = stats.planned - stats.images
    result.units, result.stolen, result.wait_seconds = stats.units, stats.stolen, stats.waited_s
    stores = [
        (out.unit_store, plan)
        for out, plan in zip(outputs, scheduler.plans, strict=True)
        if out.unit_store is not None and plan is not None
    ]
    if not stores:
        return
    t0 = time.perf_counter()
    try:
        complete, finished = True, []
        for unit_store, plan in stores:
            complete = (unit_store.finalize(plan) if stop.signum is None else False) and complete
            finished.append(unit_store.complete(plan))
            result.lease_requests += unit_store.leases.requests
        result.complete = complete
        result.units_finished, result.units_planned = min(finished)
    finally:
        for unit_store, _ in stores:
            unit_store.close()
    result.finalize_seconds = time.perf_counter() - t0

"""What a build knows before it loads a model: its targets (each model and its
outputs), every option and output checked, this process's share of the work, and the
input listed. Anything wrong is one line here, before a model loads or an output is
created (`featstore.outputs` checks the outputs themselves)."""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from featstore.batches import Failure, ImageItem
from featstore.errors import ConfigError
from featstore.images import output_collisions, unusable_names
from featstore.launch import Share, cuda_device_for, detect_share, process_cpus
from featstore.options import BuildOptions, check_options
from featstore.outputs import check_outputs
from featstore.sources import Source, as_source
from featstore.store.guard import StartGuard, output_identity
from featstore.store.location import Location, as_location
from featstore.store.writer import has_open_plan, recorded_resizer, refuse_busy_store

if TYPE_CHECKING:
    from featstore.loading import LoadedModel
    from featstore.pipeline import ModelEncoder


@dataclass(frozen=True, slots=True)
class Target:
    """One model of a build and where its features go. `build` makes the first of its own
    arguments; `build(..., also=[Target(...), ...])` adds more models, all encoded from
    one decode of each image. A target's `options` give its model's own settings
    (model, preset, size, precision, clip_output, layers, norm, embedding, resizer,
    compile); the settings of the build as a whole (device, batch size, workers,
    overwrite, recursive, limits) are the first target's."""

    options: BuildOptions
    store: str | os.PathLike[str] | Location | None = None
    npy_dir: str | os.PathLike[str] | None = None
    encoder: ModelEncoder | None = None  # replaces loading options.model (tests, benchmarks)
    loaded: LoadedModel | None = None  # a model loaded already

    @property
    def name(self) -> str:
        o = self.options
        return o.model or (f"--preset {o.preset}" if o.preset else "the model")


@dataclass(slots=True)
class BuildPlan:
    """What `build` knows before it loads a model: checked targets and outputs, this
    process's share, the listing and what failed in it. Creates nothing."""

    targets: list[Target]
    stores: list[Location | None]
    npy_dirs: list[Path | None]
    share: Share
    source: Source
    items: list[ImageItem]  # usable names, in the listing's order
    failures: list[Failure]  # found while listing, and unusable names: every model's
    excluded: list[dict[str, Failure]]  # per model: keys its per-image files cannot take (a.png beside a.jpg)
    listed: int  # everything the listing found, usable or not

    @property
    def options(self) -> BuildOptions:  # the build's shared settings
        return self.targets[0].options

    def guards(self) -> ExitStack:
        """Held from before the models load to the end: a second build of one of these
        stores started at the same instant on this machine is refused now, not once its
        model has loaded (distributed builds share their stores through leases)."""
        stack = ExitStack()
        try:
            for where in self.stores:
                if where is not None and not self.share.distributed:
                    stack.enter_context(StartGuard(where))
        except BaseException:
            stack.close()
            raise
        return stack

    def keys_for(self, m: int) -> list[str]:
        return [it.key for it in self.items if it.key not in self.excluded[m]]

    def failures_for(self, m: int) -> list[Failure]:
        return self.failures + list(self.excluded[m].values())


def _check_distinct(targets: list[Target], stores: list[Location | None], npy_dirs: list[Path | None]) -> None:
    """Two models never write one output."""
    seen: dict[str, str] = {}
    outputs = [(s.url, output_identity(s)) if s else (None, None) for s in stores]
    outputs += [(str(n), os.path.realpath(n)) if n else (None, None) for n in npy_dirs]
    for i, (shown, identity) in enumerate(outputs):
        if identity is None:
            continue
        name = targets[i % len(targets)].name
        if identity in seen:
            raise ConfigError(
                f"{shown} is the output of both {seen[identity]} and {name}: give each model its own "
                "--store / --npy-dir"
            )
        seen[identity] = name


def plan_build(input_dir: str | os.PathLike[str] | Source, targets: list[Target], share: Share | None) -> BuildPlan:
    """Check every option and output and list the input: one line for anything wrong,
    before a model loads or an output is created."""
    targets = list(targets)
    several = len(targets) > 1
    for t in targets:
        if t.store is None and t.npy_dir is None:
            raise ConfigError(f"nothing to write{' for ' + t.name if several else ''}: give --npy-dir, --store or both")
        check_options(t.options)
    stores = [as_location(t.store) if t.store is not None else None for t in targets]
    npy_dirs = [Path(t.npy_dir) if t.npy_dir is not None else None for t in targets]
    _check_distinct(targets, stores, npy_dirs)
    for where, npy in zip(stores, npy_dirs, strict=True):
        check_outputs(where, npy)
    share = share if share is not None else detect_share()
    overwrite = targets[0].options.overwrite
    if not share.distributed and not overwrite and any(w is not None and has_open_plan(w) for w in stores):
        share = Share(launcher="resume")  # finish the distributed build's units, in their order
    if share.distributed:
        targets = [
            replace(t, options=distributed_options(t.options, share, w)) for t, w in zip(targets, stores, strict=True)
        ]
    options = targets[0].options
    source = input_dir if isinstance(input_dir, Source) else as_source(input_dir, recursive=options.recursive)
    found = source.discover()  # missing shards, samples without an image, ...: failures, by name
    if not found.items:
        if found.failures:
            first = found.failures[0]
            raise ConfigError(f"{source.no_images()}; {len(found.failures)} failed, first {first.key}: {first.reason}")
        raise source.no_images()
    for i, where in enumerate(stores):
        if where is None:
            continue
        refuse_busy_store(where, leases=not share.distributed)
        resizer = targets[i].options.resizer
        if resizer == "auto" and not overwrite:  # appending keeps the store's own resizer
            targets[i] = replace(
                targets[i], options=replace(targets[i].options, resizer=recorded_resizer(where) or resizer)
            )
    bad_names = unusable_names(found.items)  # not UTF-8, backslash: refused per file
    items = [it for it in found.items if it.key not in bad_names]
    clashes = output_collisions(items) if any(npy_dirs) else {}
    # a.png and a.jpg would both write a.npy: the later one is refused where a model writes per-image files
    collided = {
        k: Failure(k, f"output name collides with {first!r} (both write the same .npy)") for k, first in clashes.items()
    }
    excluded = [collided if npy is not None else {} for npy in npy_dirs]
    if all(excluded):  # no model takes those images: not even read
        items = [it for it in items if not all(it.key in ex for ex in excluded)]
    failures = found.failures + list(bad_names.values())
    listed = len(found.items) + len(found.failures)
    return BuildPlan(targets, stores, npy_dirs, share, source, items, failures, excluded, listed)


def distributed_options(options: BuildOptions, share: Share, store: Location | None) -> BuildOptions:
    """Checks and per-process defaults of a distributed build (see `featstore.launch`)."""
    if store is not None and store.format == "hdf5":
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

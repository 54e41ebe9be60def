"""The `featstore` command: each command parses options, calls the library, prints.

Errors from `featstore.errors` become one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from featstore import __version__
from featstore.cli_groups import GroupedCommand
from featstore.errors import BuildInterrupted, FeatstoreError

app = typer.Typer(
    name="featstore",
    help="Encode folders of images into patch-feature maps of CLIP (OpenAI and LAION), DINOv2, DINOv3 and "
    "SigLIP / SigLIP2 (Zarr, HDF5 or per-image .npy).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

EXIT_SOME_FAILED = 3


class Precision(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class ClipOutput(StrEnum):
    raw = "raw"
    projected = "projected"


class Norm(StrEnum):
    model = "model"
    none = "none"
    plain = "plain"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"featstore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """featstore: precomputed vision features, correct, fast and resumable."""


STALL_NOTICE_S = 10.0  # the progress line says so when no batch came for this long


def _progress_factory(quiet: bool) -> Any:
    """A rich progress bar showing images/s; None when quiet or not on a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        return None
    import time

    from rich.progress import ProgressColumn
    from rich.text import Text

    from featstore.store.location import s3_limits

    class _Silence(ProgressColumn):
        """Says so while nothing moves (rich redraws the line ten times a second): a frozen
        object store otherwise looks like a slow batch until the requests give up."""

        def __init__(self, bar: _Bar) -> None:
            super().__init__()
            self.bar = bar

        def render(self, task: Any) -> Text:
            quiet_s = time.monotonic() - self.bar.last
            if quiet_s < STALL_NOTICE_S:
                return Text("")
            timeout, attempts = s3_limits()
            return Text(
                f"no batch for {quiet_s:.0f} s: waiting for decoding or storage (an S3 request gives up "
                f"after {attempts} tries of {timeout:g} s)"
            )

    class _Bar:
        def __init__(self, total: int) -> None:
            self.last = time.monotonic()
            self.progress = Progress(
                TextColumn("encoding"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} img/s  failed {task.fields[failed]}{task.fields[waits]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                _Silence(self),
                console=console,
            )
            self.task = self.progress.add_task("encoding", total=total, rate="-", failed=0, waits="")

        def __enter__(self) -> Any:
            self.progress.__enter__()
            return self.update

        def __exit__(self, *exc: object) -> None:
            self.progress.__exit__(*exc)  # type: ignore[arg-type]

        def update(self, run: Any) -> None:
            self.last = time.monotonic()
            # The rate is the summary's (images encoded / seconds since the first batch
            # was asked for), not rich's moving estimate, so the last one shown agrees.
            rate = f"{run.images_per_second:.1f}" if run.encoded else "-"
            done = run.encoded + run.decode_failures
            # Where the model waited: on decoding (more --workers would help) or on writing (the disk).
            waits = ""
            if run.seconds > 0:
                decode, write = run.stages.decode_wait / run.seconds, run.stages.write_wait / run.seconds
                waits = f"  waiting for decode {decode:.0%}, disk {write:.0%}"
            total = max(run.total, done) if run.total else None  # a distributed process's estimate grows
            self.progress.update(
                self.task, completed=done, total=total, rate=rate, failed=run.decode_failures, waits=waits
            )

    return _Bar


def _status_printer(quiet: bool) -> Any:
    """One-line status messages ("loading model ...") where the progress bar would be:
    on a terminal, unless quiet. Pipes and logs get the summary and errors only."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if quiet or not console.is_terminal:
        return None
    return lambda msg: console.print(msg, markup=False)


BUILD_HELP = "\n\n".join(
    [
        "Encode every image of --input (or --files); skips images already done (resume by re-running).",
        "Several models from one read and decode of each image: --model A --store a.zarr --model B --size 518 "
        "--store b.zarr. Each --model (or --preset) starts a model; the --store, --npy-dir, --size, --precision, "
        "--fp16, --clip-output, --layers, --norm, --embedding and --resizer after it are that model's. The other "
        "options are the build's, given once.",
        "Ctrl-C, SIGTERM or SIGHUP stop after the current batch, keeping what was encoded. Under torchrun or srun "
        "(or with --shard I/N) each process encodes its part of the work; re-running the same command, with any "
        "number of processes, finishes it.",
    ]
)


@app.command(cls=GroupedCommand, help=BUILD_HELP)
def build(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Registered name (see `featstore models`), HF repo id, folder or .pt. With --preset: its weights. "
            "Repeat for several models, each followed by its own --store/--npy-dir (and options).",
        ),
    ] = None,
    input: Annotated[
        str | None,
        typer.Option(
            "--input",
            "-i",
            help="Folder of images (searched recursively), s3://BUCKET/PREFIX/, or WebDataset .tar shards "
            "('train-{000000..000127}.tar', or a folder/prefix of .tar files).",
        ),
    ] = None,
    files: Annotated[
        Path | None,
        typer.Option(
            "--files",
            help="Encode only these images, in this order: a text file (one path or URL a line; relative paths "
            "start at --input) or a .csv/.parquet table with --column.",
        ),
    ] = None,
    column: Annotated[str | None, typer.Option("--column", help="The --files table's column of paths.")] = None,
    image_key: Annotated[
        str | None,
        typer.Option(
            "--image-key", help="Tar shards: the member extension holding the image (default: jpg/jpeg/png/webp)."
        ),
    ] = None,
    npy_dir: Annotated[
        Path | None,
        typer.Option(
            "--npy-dir", help="Write reference-format per-image files here (.npy, _mask.npy, .json with --save-meta)."
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store", help="Write a feature store: PATH.zarr (Zarr v3), PATH.h5 (HDF5) or s3://BUCKET/PREFIX/x.zarr."
        ),
    ] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option", help="KEY=VALUE for an s3:// store or input (e.g. endpoint_url=...); repeatable."
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            help="Input resolution (a multiple of the patch size). Default: the size column of `featstore models` "
            "(the model's native resolution; 224 for DINOv2, whose native 518 costs 5x more)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks CUDA when present.")] = "auto",
    precision: Annotated[
        Precision | None, typer.Option(help="Compute precision. Default: fp16 on CUDA, fp32 on CPU.")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Alias for --precision fp16.")] = False,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per forward pass. Default: by device.")] = None,
    workers: Annotated[
        int | None, typer.Option(min=0, help="Decode worker processes (0: decode in this process). Default: by device.")
    ] = None,
    save_meta: Annotated[bool, typer.Option("--save-meta", help="Also write the per-image .json.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-encode images that already have outputs.")] = False,
    clip_output: Annotated[
        ClipOutput, typer.Option(help="CLIP only. raw: last block; projected: ln_post + proj + L2 per patch.")
    ] = ClipOutput.raw,
    preset: Annotated[
        str | None,
        typer.Option(help="Reproduce a published extractor exactly: trellis or trellis2 (see `featstore models`)."),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="hidden_states to store, e.g. -1 or 4,11,17,23 (0 = embeddings, -1 = last block before the "
            "final norm). Several: rows of (L, C, g, g). Default: the family's standard output."
        ),
    ] = None,
    norm: Annotated[
        Norm | None,
        typer.Option(help="For --layers: model (the final norm), none, or plain (layer norm without weights)."),
    ] = None,
    embedding: Annotated[
        bool | None,
        typer.Option(
            "--embedding/--no-embedding",
            help="Store a pooled embedding per image (CLIP image_embeds, DINO CLS, SigLIP pooled). "
            "Default: on for stores; --npy-dir writes NAME_embedding.npy only with --embedding.",
        ),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(min=1, help="Refuse images with more pixels than this (decompression bombs).")
    ] = 178_956_970,
    max_image_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Refuse image files larger than this many bytes, before reading them (default 1 GiB: "
            "memory per decode worker).",
        ),
    ] = 1 << 30,
    resizer: Annotated[
        str,
        typer.Option(
            help="auto (the default): torch's uint8 resize where both sides shrink 2x or more (about 8x "
            "faster than Pillow's, within 1 level of its pixels there), Pillow's elsewhere; appending keeps "
            "the store's own resizer. pillow: Pillow's everywhere (exact: the reference scripts' pixels). "
            "torch: torch's everywhere (up to 2 levels off, more when squashing). Masks are Pillow's with "
            "each; the store records the resizer and refuses rows of another one.",
        ),
    ] = "auto",
    recursive: Annotated[bool, typer.Option(help="Search subfolders of --input.")] = True,
    compile: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile the model: slower start (compiling), faster long runs on a GPU."),
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help=f"Exit {EXIT_SOME_FAILED} if any image failed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="I/N",
            help="Do part I of N (0-based) of the work: job arrays, machines without a shared launcher. "
            "Under torchrun or srun the part comes from the launcher.",
        ),
    ] = None,
    unit_images: Annotated[
        int | None,
        typer.Option(
            "--unit-images",
            min=1,
            help="Distributed builds: images per work unit (rounded up to whole store shards). Default: 4096.",
        ),
    ] = None,
) -> None:
    # the help text is BUILD_HELP (paragraphs as single lines, which the help display wraps)
    from dataclasses import replace

    from featstore.launch import detect_share
    from featstore.pipeline import BuildOptions
    from featstore.pipeline import build as run_build

    share = detect_share(shard)
    quiet = quiet or share.rank > 0  # one progress bar per job: the first process's

    from featstore.cli_groups import model_groups

    groups = model_groups(ctx)
    shared = BuildOptions(
        device=device,
        batch_size=batch_size,
        workers=workers,
        overwrite=overwrite,
        recursive=recursive,
        max_pixels=max_pixels,
        max_image_bytes=max_image_bytes,
        compile=compile,
    )
    if len(groups) == 1:  # one model: the options as parsed
        parsed: dict[str, Any] = dict(model=model, preset=preset, store=store, npy_dir=npy_dir, size=size)
        parsed |= dict(precision=precision, fp16=fp16, clip_output=clip_output, layers=layers, norm=norm)
        parsed |= dict(embedding=embedding, resizer=resizer)
        per_model = [{k: v for k, v in parsed.items() if v is not None}]
    else:
        per_model = [g.values for g in groups]
    outputs = [(replace(shared, **_model_options(v)), v.get("store"), v.get("npy_dir")) for v in per_model]
    from featstore.pipeline import Target
    from featstore.sources import as_source
    from featstore.store.location import as_location, parse_storage_options

    storage_options = parse_storage_options(storage_option or ())
    seam = (ctx.obj or {}).get("encoder")  # tests: an encoder, or {model name: encoder}, for the models
    targets = [
        Target(
            opts,
            as_location(where, storage_options) if where is not None else None,
            npy,
            encoder=seam.get(opts.model) if isinstance(seam, dict) else seam if i == 0 else None,
        )
        for i, (opts, where, npy) in enumerate(outputs)
    ]
    source = as_source(
        input, files=files, column=column, image_key=image_key, storage_options=storage_options, recursive=recursive
    )
    first = targets[0]
    result = run_build(
        source,
        first.options,
        npy_dir=first.npy_dir,
        store=first.store,
        save_meta=save_meta,
        progress_factory=_progress_factory(quiet),
        encoder=first.encoder,
        log=_status_printer(quiet),
        share=share,
        unit_images=unit_images,
        also=targets[1:],
    )
    typer.echo(result.summary(), err=True)
    for f in result.failures[:20]:
        typer.echo(f"  failed: {f.key}: {f.reason}", err=True)
    if result.failed > 20:
        typer.echo(f"  ... and {result.failed - 20} more (see the failure log)", err=True)
    if strict and result.failed:
        raise typer.Exit(EXIT_SOME_FAILED)


def _model_options(values: dict[str, Any]) -> dict[str, Any]:
    """One model's `BuildOptions` fields from its options: as parsed (one model), or as
    `featstore.cli_groups` read them from a command line of several."""
    from featstore.models import parse_layers

    precision = values.get("precision")
    if values.get("fp16"):
        if precision not in (None, "fp16"):
            raise typer.BadParameter(f"--fp16 conflicts with --precision {precision}")
        precision = "fp16"
    out = {
        "model": values.get("model"),
        "size": values.get("size"),
        "precision": precision,
        "clip_output": values.get("clip_output", ClipOutput.raw.value),
        "layers": parse_layers(values["layers"]) if "layers" in values else None,
        "norm": values.get("norm"),
        "preset": values.get("preset"),
        "embedding": values.get("embedding"),
    }
    if "resizer" in values:
        out["resizer"] = values["resizer"]
    return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in out.items()}


@app.command()
def models() -> None:
    """List the registered model names and presets with their default --size and shapes."""
    from featstore.models import models_table

    for line in models_table():
        typer.echo(line.rstrip())


@app.command()
def prefetch(
    model: Annotated[str, typer.Argument(help="Registered name, preset (trellis, trellis2) or Hugging Face repo id.")],
    to: Annotated[
        Path | None,
        typer.Option("--to", help="Download into this folder (then build with --model DIR) instead of the HF cache."),
    ] = None,
) -> None:
    """Download exactly what a build of MODEL reads (config, preprocessor config, safetensors weights),
    on a machine with internet; builds then need no network (see "Offline and clusters" in the README)."""
    from featstore.prefetch import prefetch as run

    done = run(model, to=to)
    where = str(done.folder) if done.cache is None else f"the Hugging Face cache ({done.cache})"
    typer.echo(
        f"fetched {done.repo} at revision {done.revision[:12]} into {where}: {', '.join(done.files)} "
        f"({done.bytes / 1e6:.1f} MB)"
    )
    if done.cache is None:
        typer.echo(f"build with: featstore build --model {done.folder} ...")
    else:
        typer.echo(
            f"builds on a machine that reads this cache find it with no network: "
            f"HF_HUB_OFFLINE=1 featstore build --model {model} ..."
        )


try:  # the store commands live beside the store code
    from featstore.cli_store import register as _register_store_commands
except ImportError:  # pragma: no cover - only while the store module is absent
    pass
else:
    _register_store_commands(app)


# click's exceptions, wherever this typer takes click from (recent typers carry their own copy)
_clickx: Any = sys.modules[typer.BadParameter.__module__]


def usage_line(e: Any) -> str:
    """A usage error as one line and a hint, instead of click's usage box."""
    message = " ".join(e.format_message().split()).rstrip(".")
    command = e.ctx.command_path if e.ctx is not None else "featstore"
    return f"{message[:1].lower()}{message[1:]} (`{command} --help` lists the options)"


def main(argv: list[str] | None = None, *, encoder: Any = None) -> None:
    """The `featstore` command. `encoder` stands in for the model in `build` (tests use a fake),
    or {model name: encoder} for several models."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        # not standalone: click's errors come here, to be printed as featstore's one-line errors
        code = app(args=argv, prog_name="featstore", obj={"encoder": encoder}, standalone_mode=False)
    except _clickx.NoArgsIsHelpError as e:
        e.show()  # `featstore` alone, or a command group without a command: its help
        sys.exit(2)
    except _clickx.UsageError as e:
        typer.echo(f"featstore: error: {usage_line(e)}", err=True)
        sys.exit(e.exit_code)
    except _clickx.ClickException as e:
        typer.echo(f"featstore: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # end of input at a prompt
        typer.echo("featstore: interrupted", err=True)
        sys.exit(1)
    except BuildInterrupted as e:
        typer.echo(f"featstore: {e}", err=True)
        sys.exit(e.exit_code)
    except FeatstoreError as e:
        typer.echo(f"featstore: error: {e}", err=True)
        sys.exit(e.exit_code)
    if code == 130:  # Ctrl-C before `build` handles signals itself (while torch imports, say)
        typer.echo("featstore: interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does: always SystemExit

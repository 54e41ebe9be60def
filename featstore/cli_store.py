"""The store commands of the `featstore` CLI: each parses, calls `featstore.store.ops`, prints.

FeatstoreErrors propagate: `featstore.cli.main` prints them on one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

STORE_HELP = "A store: PATH.zarr (Zarr v3) or PATH.h5 / PATH.hdf5 (HDF5)."


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def export_npy(
    store: Annotated[Path, typer.Argument(help=STORE_HELP)],
    out: Annotated[Path, typer.Argument(help="Folder to write <key stem>.npy and <key stem>_mask.npy into.")],
    save_meta: Annotated[
        bool, typer.Option("--save-meta", help="Also write the per-image .json of the reference scripts.")
    ] = False,
    keys: Annotated[
        list[str] | None, typer.Option("--keys", "-k", help="Export only this key (repeat for several).")
    ] = None,
) -> None:
    """Write a store's rows as reference-format per-image files (byte-identical to `build --npy-dir`)."""
    from featstore.store.ops import export_npy as run

    result = run(store, out, save_meta=save_meta, keys=keys)
    typer.echo(f"wrote {result.written} image(s) to {out}")
    for f in result.refused:
        typer.echo(f"  refused {f.key!r}: {f.reason}", err=True)
    if result.refused:
        raise typer.Exit(3)


def import_npy(
    npy_dir: Annotated[
        Path, typer.Argument(help="Folder of x.npy + x_mask.npy (+ x.json) files, searched recursively.")
    ],
    store: Annotated[Path, typer.Argument(help=STORE_HELP + " Created if absent, else appended to.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="The model that made the features; required when there are no .json files."),
    ] = None,
) -> None:
    """Ingest reference-format per-image outputs into a store (rows already there are skipped).

    Keys are the file paths relative to NPY_DIR with the image's extension from the JSON
    "source" (sub/a.npy + source .../a.png -> sub/a.png), or with ".npy" without JSON.
    """
    from featstore.store.ops import import_npy as run

    result = run(npy_dir, store, model=model)
    typer.echo(f"imported {result.imported} row(s) into {store}; {result.skipped} already there")
    for f in result.refused:
        typer.echo(f"  refused {f.key!r}: {f.reason}", err=True)
    if result.refused:
        raise typer.Exit(3)


def info(
    store: Annotated[Path, typer.Argument(help=STORE_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
) -> None:
    """Describe a store: model, shapes, rows, failures, arrays, codecs and disk use."""
    from featstore.store.ops import info as run

    d = run(store)
    if as_json:
        typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    src = d["model_source"]
    ratio = d["compression_ratio"]
    lines = [
        f"{d['path']}  ({d['format']}, layout {d['layout_version']}, featstore {d['featstore_version']}, "
        f"created {d['created']})",
        f"model         {d['model']}  [{', '.join(f'{k}={v}' for k, v in src.items())}]",
        f"features      {d['feature_type']} ({d['family']}, clip_output {d['clip_output']}), "
        f"size {d['size']}, shape {tuple(d['feature_shape'])} {d['dtype']}",
        f"rows          {d['num_rows']}   failed: {d['num_failed']}",
        f"disk          {_size(d['bytes_on_disk'])} in {d['file_count']} file(s); "
        f"numeric data {_size(d['uncompressed_bytes'])} uncompressed"
        + (f" (compression ratio {ratio:.2f})" if ratio else ""),
        "arrays",
    ]
    for name, a in d["arrays"].items():
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        chunks = tuple(a["chunks"]) if a["chunks"] else None
        lines.append(
            f"  {name:<13} {tuple(a['shape'])!s:<22} {a['dtype']:<8} chunks {chunks}{shards}  "
            f"codecs {', '.join(a['codecs'])}"
        )
    typer.echo("\n".join(lines))


def ls(store: Annotated[Path, typer.Argument(help=STORE_HELP)]) -> None:
    """Print the keys of a store's rows, one per line, in row order."""
    from featstore.store import open_store

    with open_store(store) as s:
        keys = s.keys()
    for key in keys:
        typer.echo(key)


def convert(
    src: Annotated[Path, typer.Argument(help="The store to read. " + STORE_HELP)],
    dst: Annotated[Path, typer.Argument(help="The store to create; its suffix picks the format.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
) -> None:
    """Copy a store into another format (Zarr <-> HDF5): same rows, order, encoding and failures."""
    from featstore.store.ops import convert as run

    n = run(src, dst, overwrite=overwrite)
    typer.echo(f"converted {n} row(s): {src} -> {dst}")


def preview(
    store: Annotated[Path, typer.Argument(help=STORE_HELP)],
    key: Annotated[str, typer.Argument(help="The row's key (image path relative to the input folder), or its index.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")],
    image: Annotated[
        Path | None, typer.Option("--image", help="The input folder of the build: show the source image too.")
    ] = None,
) -> None:
    """Save a PNG of one row: PCA of its features as RGB, its mask (and the source image)."""
    from featstore.preview import render_preview
    from featstore.store import open_store

    with open_store(store) as s:
        item = key if key in s or not key.lstrip("-").isdigit() else s[int(key)].key
        render_preview(s, item, out, image_root=image)
    typer.echo(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the store commands to the featstore CLI."""
    app.command("export-npy")(export_npy)
    app.command("import-npy")(import_npy)
    app.command("info")(info)
    app.command("ls")(ls)
    app.command("convert")(convert)
    app.command("preview")(preview)

"""The store commands of the `featstore` CLI: each parses, calls `featstore.convert` or
`featstore.store`, prints.

Every STORE argument is a path or a URL (`s3://bucket/prefix/x.zarr`), normalised once
here into a `Location`, with `--storage-option KEY=VALUE`s. FeatstoreErrors propagate:
`featstore.cli.main` prints them on one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from featstore.store.location import Location, as_location, parse_storage_options

STORE_HELP = "A store: PATH.zarr (Zarr v3), PATH.h5 / PATH.hdf5 (HDF5) or s3://BUCKET/PREFIX/x.zarr."
StorageOptions = Annotated[
    list[str] | None,
    typer.Option("--storage-option", help="KEY=VALUE for an s3:// store (e.g. endpoint_url=...); repeatable."),
]


def _loc(store: str, options: list[str] | None) -> Location:
    return as_location(store, parse_storage_options(options or ()))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def export_npy(
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    out: Annotated[Path, typer.Argument(help="Folder to write <key stem>.npy and <key stem>_mask.npy into.")],
    save_meta: Annotated[
        bool, typer.Option("--save-meta", help="Also write the per-image .json of the reference scripts.")
    ] = False,
    keys: Annotated[
        list[str] | None, typer.Option("--keys", "-k", help="Export only this key (repeat for several).")
    ] = None,
    embedding: Annotated[
        bool, typer.Option("--embedding", help="Also write NAME_embedding.npy (stores that hold embeddings).")
    ] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Write a store's rows as reference-format per-image files (byte-identical to `build --npy-dir`)."""
    from featstore.convert import export_npy as run
    from featstore.errors import StoreError

    try:
        result = run(_loc(store, storage_option), out, save_meta=save_meta, keys=keys, embedding=embedding)
    except KeyError as e:
        raise StoreError(str(e.args[0]) if e.args else str(e)) from None
    typer.echo(f"wrote {result.written} image(s) to {out}")
    for f in result.refused:
        typer.echo(f"  refused {f.key!r}: {f.reason}", err=True)
    if result.refused:
        raise typer.Exit(3)


def import_npy(
    npy_dir: Annotated[
        Path, typer.Argument(help="Folder of x.npy + x_mask.npy (+ x.json) files, searched recursively.")
    ],
    store: Annotated[str, typer.Argument(help=STORE_HELP + " Created if absent, else appended to.")],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="The model that made the features; required when there are no .json files."),
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Ingest reference-format per-image outputs into a store (rows already there are skipped).

    Keys are the file paths relative to NPY_DIR with the image's extension from the JSON
    "source" (sub/a.npy + source .../a.png -> sub/a.png), or with ".npy" without JSON.
    """
    from featstore.convert import import_npy as run

    result = run(npy_dir, _loc(store, storage_option), model=model)
    typer.echo(f"imported {result.imported} row(s) into {store}; {result.skipped} already there")
    for f in result.refused:
        typer.echo(f"  refused {f.key!r}: {f.reason}", err=True)
    if result.refused:
        raise typer.Exit(3)


def info(
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="List every failed image (default: the first 5).")] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Describe a store: model, shapes, rows, failures, arrays, codecs and disk use."""
    from featstore.convert import info as run

    d = run(_loc(store, storage_option))
    if as_json:
        typer.echo(json.dumps(d, indent=2, ensure_ascii=False))
        return
    src = d["model_source"]
    ratio = d["compression_ratio"]
    lines = [
        f"{d['path']}  ({d['format']}, layout {d['layout_version']}, featstore {d['featstore_version']}, "
        f"created {d['created']})",
        f"model         {d['model']}  [{', '.join(f'{k}={v}' for k, v in src.items())}]",
        f"features      {d['feature_type']} ({d['family']}"
        + (f", clip_output {d['clip_output']}" if d["family"] == "clip" else "")
        + f"), size {d['size']}, shape {tuple(d['feature_shape'])} {d['dtype']}"
        + (f", embedding {d['embedding_dim']}" if d.get("embedding_dim") else ""),
        f"preprocessing {_preprocessing(d.get('preprocessing'))}",
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
    shown = d["failed"] if failed else d["failed"][:5]
    for f in shown:
        lines.append(f"  failed  {f.get('key')!r}: {f.get('reason', '')}")
    if len(shown) < len(d["failed"]):
        lines.append(f"  ... and {len(d['failed']) - len(shown)} more (--failed lists them all)")
    typer.echo("\n".join(lines))


def _preprocessing(p: object) -> str:
    if not isinstance(p, dict):
        return "unknown"
    done = f"{p.get('resize')}; {p.get('premultiply')}; mean {p.get('mean')}, std {p.get('std')}"
    if p.get("name") == "opencv_alpha_multiplication":
        # the reference scripts' value, kept so their readers still recognise the rows
        return f"{done}  (named {p.get('name')!r} as in the reference format; OpenCV is not used)"
    return f"{p.get('name')}: {done}"


def ls(store: Annotated[str, typer.Argument(help=STORE_HELP)], storage_option: StorageOptions = None) -> None:
    """Print the keys of a store's rows, one per line, in row order."""
    from featstore.store import open_store

    with open_store(_loc(store, storage_option)) as s:
        keys = s.keys()
    for key in keys:
        typer.echo(key)


def convert(
    src: Annotated[str, typer.Argument(help="The store to read. " + STORE_HELP)],
    dst: Annotated[str, typer.Argument(help="The store to create; its suffix picks the format.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Copy a store into another format or place (Zarr <-> HDF5, local <-> S3): same rows, order, encoding, failures."""
    from featstore.convert import convert as run

    n = run(_loc(src, storage_option), _loc(dst, storage_option), overwrite=overwrite)
    typer.echo(f"converted {n} row(s): {src} -> {dst}")


def preview(
    store: Annotated[str, typer.Argument(help=STORE_HELP)],
    key: Annotated[str, typer.Argument(help="The row's key (image path relative to the input folder), or its index.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The PNG to write.")],
    image: Annotated[
        Path | None, typer.Option("--image", help="The input folder of the build: show the source image too.")
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Save a PNG of one row: PCA of its features as RGB, its mask (and the source image)."""
    from featstore.errors import StoreError
    from featstore.preview import render_preview
    from featstore.store import open_store

    with open_store(_loc(store, storage_option)) as s:
        if key in s:
            item = key
        elif key.lstrip("-").isdigit():
            if not -len(s) <= int(key) < len(s):
                raise StoreError(f"{store} has no row {key} (it holds {len(s)} rows, 0..{len(s) - 1})")
            item = s[int(key)].key
        else:
            raise StoreError(f"{store} has no row with key {key!r}")
        render_preview(s, item, out, image_root=image)
    typer.echo(f"wrote {out}")


def upgrade(store: Annotated[str, typer.Argument(help=STORE_HELP)], storage_option: StorageOptions = None) -> None:
    """Bring a store written by an older featstore to the current layout and metadata, in place.

    Zarr: layout 1 (featstore 0.1) to 2, dimension names, the key_hash index and
    consolidated metadata; HDF5: dimension scales. Rows are kept as they are.
    """
    from featstore.store import LAYOUT_VERSION, upgrade_store

    old = upgrade_store(_loc(store, storage_option))
    if old == LAYOUT_VERSION:
        typer.echo(f"{store} has layout {LAYOUT_VERSION}; its metadata is current (dimension names, key index)")
    else:
        typer.echo(f"upgraded {store}: layout {old} -> {LAYOUT_VERSION}")


def finalize(store: Annotated[str, typer.Argument(help=STORE_HELP)], storage_option: StorageOptions = None) -> None:
    """Finish a distributed build's store: merge every process's failures, set the array shapes.

    The process that finishes the last unit does this itself; run it after `--shard`
    runs if you want to be sure, or to see how many units are finished.
    """
    from featstore.errors import StoreError
    from featstore.store.units import finalize_store

    location = _loc(store, storage_option)
    if location.format != "zarr":
        raise StoreError(f"{location}: only Zarr stores are written by distributed builds")
    done, total, finalized = finalize_store(location)
    if not total:
        typer.echo(f"{store}: no distributed build to finalize")
    elif finalized:
        typer.echo(f"{store}: complete ({total} units)")
    else:
        typer.echo(
            f"{store}: {done} of {total} units finished; re-run the build (any number of processes) to finish it"
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the store commands to the featstore CLI."""
    app.command("export-npy")(export_npy)
    app.command("import-npy")(import_npy)
    app.command("info")(info)
    app.command("ls")(ls)
    app.command("convert")(convert)
    app.command("preview")(preview)
    app.command("upgrade")(upgrade)
    app.command("finalize")(finalize)

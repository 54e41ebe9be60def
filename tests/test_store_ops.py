"""export-npy / import-npy / convert / info / preview, as library calls and as CLI commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featstore.batches import Failure
from featstore.convert import convert, export_npy, import_key, import_npy, info
from featstore.errors import ConfigError, StoreError
from featstore.npy import NpyWriter
from featstore.preview import pca_rgb, render_preview
from featstore.store import open_store, open_store_writer
from tests.store_helpers import C, G, make_batch, make_info

KEYS = ["a.png", "sub/b.jpg", "sub/deeper/c d.webp", "ünï.png", "dots.in.name.png"]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def build_both(tmp_path: Path, suffix: str, keys: list[str] = KEYS) -> tuple[Path, Path]:
    """The same rows written by the pipeline's NpyWriter and by StoreWriter."""
    info = make_info()
    batch = make_batch(keys, root="/data/imgs")
    npy = tmp_path / "npy"
    w = NpyWriter(npy, info, save_meta=True, overwrite=False)
    w.pending(keys)
    w.write(batch)
    w.close()
    store = tmp_path / f"s{suffix}"
    with open_store_writer(store, info, overwrite=False) as sw:
        sw.write(batch)
    return npy, store


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_export_is_byte_identical_to_the_npy_writer(tmp_path: Path, suffix: str) -> None:
    npy, store = build_both(tmp_path, suffix)
    out = tmp_path / "exported"
    result = export_npy(store, out, save_meta=True)
    assert result.written == len(KEYS) and not result.refused
    assert files_of(out) == files_of(npy)
    assert "sub/deeper/c d.json" in files_of(out)
    bare = export_npy(store, tmp_path / "bare", save_meta=False, keys=["sub/b.jpg"])
    assert bare.written == 1 and sorted(files_of(tmp_path / "bare")) == ["sub/b.npy", "sub/b_mask.npy"]
    with pytest.raises(KeyError):
        export_npy(store, tmp_path / "x", save_meta=False, keys=["absent.png"])


def test_export_refuses_unsafe_keys(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with open_store_writer(store, make_info(), overwrite=False) as w:
        w.write(make_batch(["../evil.png", "/abs/x.png", "a/../../b.png", "ok.png"]))
    out = tmp_path / "deep" / "out"
    result = export_npy(store, out, save_meta=True)
    assert result.written == 1 and sorted(f.key for f in result.refused) == [
        "../evil.png",
        "/abs/x.png",
        "a/../../b.png",
    ]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.npy")) == [
        "deep/out/ok.npy",
        "deep/out/ok_mask.npy",
    ]


def test_import_with_json_round_trips(tmp_path: Path) -> None:
    npy, _ = build_both(tmp_path, ".zarr")
    store = tmp_path / "imported.h5"
    result = import_npy(npy, store)
    assert result.imported == len(KEYS) and not result.refused
    with open_store(store) as s:
        assert sorted(s.keys()) == sorted(KEYS)
        assert s.info.model == "ViT-B/32" and s.info.feature_type == "clip_vit_last_layer" and s.info.grid == G
        assert s.attrs["model_source"]["kind"] == "imported"
        assert s["sub/b.jpg"].source == "/data/imgs/sub/b.jpg"
    export_npy(store, tmp_path / "again", save_meta=True)
    assert files_of(tmp_path / "again") == files_of(npy)
    assert import_npy(npy, store).skipped == len(KEYS)  # a rerun adds nothing


def test_import_without_json_needs_a_registered_model_that_fits(tmp_path: Path) -> None:
    info = make_info(hidden_dim=768, grid=7)  # ViT-B/32 at 224, raw
    npy = tmp_path / "npy"
    w = NpyWriter(npy, info, save_meta=False, overwrite=False)
    w.pending(KEYS)
    w.write(make_batch(KEYS, info=info))
    with pytest.raises(ConfigError, match="--model"):
        import_npy(npy, tmp_path / "s.zarr")
    with pytest.raises(ConfigError, match=r"768 channels, but facebook/dinov2-small makes 384 \(raw\)"):
        import_npy(npy, tmp_path / "s.zarr", model="facebook/dinov2-small")  # would mislabel the store
    with pytest.raises(ConfigError, match=r"not a registered model .* size, preprocessing and feature type .* unknown"):
        import_npy(npy, tmp_path / "s.zarr", model="my-own-vit")
    assert not (tmp_path / "s.zarr").exists()  # refused before anything was written
    result = import_npy(npy, tmp_path / "s.zarr", model="ViT-B/32")
    assert result.imported == len(KEYS)
    with open_store(tmp_path / "s.zarr") as s:
        assert "sub/b.npy" in s and "dots.in.name.npy" in s
        assert s.info.hidden_dim == 768 and s.info.grid == 7 and s.info.dtype == "float16"
        assert s.info.size == 224 and s.info.clip_output == "raw" and s.info.family == "clip"
        np.testing.assert_array_equal(s["sub/b.npy"].features, np.load(npy / "sub" / "b.npy"))
    export_npy(tmp_path / "s.zarr", tmp_path / "again", save_meta=False)
    assert files_of(tmp_path / "again") == files_of(npy)  # same file names back


def test_import_with_json_refuses_a_model_that_does_not_fit(tmp_path: Path) -> None:
    npy, _ = build_both(tmp_path, ".zarr")  # 16-channel rows whose JSON says ViT-B/32
    with pytest.raises(ConfigError, match="16 channels, but facebook/dinov2-small makes 384"):
        import_npy(npy, tmp_path / "s.h5", model="facebook/dinov2-small")


def test_import_refuses_odd_files(tmp_path: Path) -> None:
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", np.zeros((384, G, G), np.float16))  # dinov2-small's channels
    np.save(npy / "a_mask.npy", np.ones((G, G), np.uint8))
    np.save(npy / "b.npy", np.zeros((384, G + 1, G + 1), np.float16))
    np.save(npy / "b_mask.npy", np.ones((G + 1, G + 1), np.uint8))
    np.save(npy / "lonely.npy", np.zeros(3))
    result = import_npy(npy, tmp_path / "s.zarr", model="facebook/dinov2-small")
    assert result.imported == 1 and [f.key for f in result.refused] == ["b.npy"]
    with pytest.raises(StoreError, match="no reference-format outputs"):
        import_npy(tmp_path / "s.zarr", tmp_path / "t.zarr", model="m")


def test_import_key() -> None:
    assert import_key("sub/a", {"source": "/x/sub/a.png"}) == "sub/a.png"
    assert import_key("sub/a", {"source": "C:\\x\\sub\\a.JPG"}) == "sub/a.JPG"
    assert import_key("sub/a", {"source": "/x/renamed.png"}) == "sub/a.npy"
    assert import_key("sub/a.b", None) == "sub/a.b.npy"


@pytest.mark.parametrize(("src", "dst"), [(".zarr", ".h5"), (".h5", ".zarr")])
def test_convert(tmp_path: Path, src: str, dst: str) -> None:
    a, b = tmp_path / f"a{src}", tmp_path / f"b{dst}"
    with open_store_writer(a, make_info(), overwrite=False, shard_rows=4) as w:
        w.write(make_batch(KEYS))
        w.record_failures([Failure("bad.png", "broken")])
    assert convert(a, b) == len(KEYS)
    with open_store(a) as x, open_store(b) as y:
        assert y.format != x.format and y.keys() == x.keys() and y.sources() == x.sources()
        np.testing.assert_array_equal(y.get_batch(KEYS).features, x.get_batch(KEYS).features)
        np.testing.assert_array_equal(y.get_batch(KEYS).masks, x.get_batch(KEYS).masks)
        assert y.info == x.info and y.failed == x.failed
    with pytest.raises(StoreError, match="exists"):
        convert(a, b)


def test_info(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    with open_store_writer(store, make_info(), overwrite=False, shard_rows=4) as w:
        w.write(make_batch(KEYS))
    d = info(store)
    assert d["num_rows"] == len(KEYS) and d["format"] == "zarr" and d["feature_shape"] == [C, G, G]
    assert d["arrays"]["features"]["shards"] == [4, C, G, G] and d["arrays"]["features"]["chunks"] == [1, C, G, G]
    assert d["uncompressed_bytes"] == len(KEYS) * (C * G * G * 2 + G * G + 8 + 8)  # + key_hash
    assert d["bytes_on_disk"] > 0 and d["file_count"] > 5 and d["compression_ratio"] > 0
    json.dumps(d)


def test_pca_rgb() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(C, G, G)).astype(np.float16)
    mask = np.ones((G, G), np.uint8)
    mask[0] = 0
    rgb = pca_rgb(feats, mask)
    assert rgb.shape == (G, G, 3) and rgb.dtype == np.uint8
    assert (rgb[0] == 0).all() and rgb[1:].max() == 255
    assert pca_rgb(np.zeros((2, 1, 1), np.float32)).shape == (1, 1, 3)  # degenerate: no crash


def test_preview(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    with open_store_writer(store, make_info(), overwrite=False) as w:
        w.write(make_batch(["sub/b.png"]))
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "sub" / "b.png")
    with open_store(store) as s:
        out = render_preview(s, "sub/b.png", tmp_path / "p.png")
        assert Image.open(out).size == (2 * 256 + 4, 256)
        out = render_preview(s, "sub/b.png", tmp_path / "q.png", image_root=images)
        with Image.open(out) as im:
            assert im.size == (3 * 256 + 8, 256) and im.getpixel((128, 128)) == (200, 10, 10)


# -- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def cli_store(tmp_path: Path) -> Path:
    store = tmp_path / "s.zarr"
    with open_store_writer(store, make_info(), overwrite=False) as w:
        w.write(make_batch(KEYS))
    return store


def invoke(*args: str):  # type: ignore[no-untyped-def]
    from featstore.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_info_ls_convert_export_preview(cli_store: Path, tmp_path: Path) -> None:
    r = invoke("info", str(cli_store))
    assert r.exit_code == 0, r.output
    assert "ViT-B/32" in r.output and "features" in r.output and f"rows          {len(KEYS)}" in r.output
    r = invoke("info", str(cli_store), "--json")
    assert json.loads(r.output)["num_rows"] == len(KEYS)
    r = invoke("ls", str(cli_store))
    assert r.output.splitlines() == KEYS
    r = invoke("convert", str(cli_store), str(tmp_path / "c.h5"))
    assert r.exit_code == 0 and "converted 5" in r.output
    r = invoke("export-npy", str(tmp_path / "c.h5"), str(tmp_path / "out"), "--save-meta", "--keys", "a.png")
    assert r.exit_code == 0 and sorted(files_of(tmp_path / "out")) == ["a.json", "a.npy", "a_mask.npy"]
    r = invoke("import-npy", str(tmp_path / "out"), str(tmp_path / "i.zarr"))
    assert r.exit_code == 0 and "imported 1" in r.output
    r = invoke("preview", str(cli_store), "1", "-o", str(tmp_path / "p.png"))
    assert r.exit_code == 0 and (tmp_path / "p.png").exists()
    r = invoke("preview", str(cli_store), "absent.png", "-o", str(tmp_path / "p.png"))
    assert r.exit_code != 0


def test_cli_help_documents_every_option() -> None:
    for cmd, options in {
        "export-npy": ["--save-meta", "--keys"],
        "import-npy": ["--model"],
        "info": ["--json"],
        "ls": [],
        "convert": ["--overwrite"],
        "preview": ["--image", "--out"],
    }.items():
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and all(o in r.output for o in options), (cmd, r.output)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from featstore.cli import main

    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "absent.zarr")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no store at" in err


def _one_line_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from featstore.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err


def test_cli_unknown_rows_are_one_line_naming_them(
    cli_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "p.png")
    assert "no row with key 'nosuch.png'" in _one_line_error(
        ["preview", str(cli_store), "nosuch.png", "-o", out], capsys
    )
    assert "no row 99" in _one_line_error(["preview", str(cli_store), "99", "-o", out], capsys)
    err = _one_line_error(["export-npy", str(cli_store), str(tmp_path / "x"), "--keys", "nosuch.png"], capsys)
    assert "nosuch.png" in err and not (tmp_path / "x").exists()


def test_cli_preview_with_the_wrong_image_root_says_so(
    cli_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_store(cli_store) as s:
        key = s.keys()[0]
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    err = _one_line_error(
        ["preview", str(cli_store), key, "--image", str(wrong), "-o", str(tmp_path / "p.png")], capsys
    )
    assert f"the source image of {key!r} is not under {wrong}" in err and "deleted during the run" not in err


def test_cli_info_lists_failures_and_preprocessing(tmp_path: Path) -> None:
    store = tmp_path / "d.zarr"
    info = make_info(family="dinov2", feature_type="dinov2_patch_features", model="facebook/dinov2-small")
    with open_store_writer(store, info, overwrite=False) as w:
        w.write(make_batch(KEYS[:2], info=info))
        w.record_failures([Failure(f"bad{i}.png", "cannot decode") for i in range(7)])
    r = invoke("info", str(store))
    assert r.exit_code == 0, r.output
    assert (
        "clip_output" not in r.output
        and "named 'opencv_alpha_multiplication' as in the reference format; OpenCV is not used" in r.output
    )
    assert "preprocessing shorter-side bicubic (antialiased), center crop; rgb = uint8(" in r.output
    assert "'bad4.png': cannot decode" in r.output and "bad5.png" not in r.output and "2 more" in r.output
    r = invoke("info", str(store), "--failed")
    assert "'bad6.png'" in r.output and "more" not in r.output


def test_info_during_a_first_hdf5_build_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.h5"
    w = open_store_writer(path, make_info(), overwrite=False, shard_rows=2)
    w.write(make_batch(KEYS[:3]))  # a shard staged, the file not written yet
    try:
        assert "a first build is in progress" in _one_line_error(["info", str(path)], capsys)
    finally:
        w.close()
    assert invoke("info", str(path)).exit_code == 0


def test_joined_stores_without_common_keys_are_refused(tmp_path: Path) -> None:
    from featstore.torch import FeatureDataset

    for name, keys in (("a", KEYS[:2]), ("b", KEYS[2:])):
        with open_store_writer(tmp_path / f"{name}.zarr", make_info(), overwrite=False) as w:
            w.write(make_batch(keys))
    with pytest.raises(ValueError, match="no key in common"):
        FeatureDataset({"a": tmp_path / "a.zarr", "b": tmp_path / "b.zarr"})

"""The README's quick start works on a fresh clone, as written (tiny models stand in for the hub's)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.test_cli import REPO, featstore

README = (REPO / "README.md").read_text()


def _block(after: str, lang: str) -> str:
    start = README.index(after)
    return re.search(rf"```{lang}\n(.*?)```", README[start:], re.S).group(1)  # type: ignore[union-attr]


def test_top_level_is_the_documented_layout():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an unpacked archive): nothing to compare
        return
    top = {p.split("/")[0] for p in tracked if not p.startswith(".")}
    assert top == {"featstore", "cli", "tests", "benchmarks", "pyproject.toml", "uv.lock", "README.md"}


def _commands(after: str) -> list[list[str]]:
    return [shlex.split(line) for line in _block(after, "bash").splitlines() if line.strip()]


def test_quick_start_commands_and_reading_examples(tiny_models, tmp_path):
    models = {"ViT-B/32": tiny_models["clip"], "facebook/dinov2-small": tiny_models["dino"]}
    quick = _commands("## Quick start")  # two commands, each doing its own set-up under uv
    more = _commands("A CLIP store of the same images")
    assert [c[:4] for c in quick] == [["uv", "run", "featstore", "build"], ["uv", "run", "featstore", "info"]]
    assert [c[:4] for c in more] == [["uv", "run", "featstore", "build"]] * 2
    for cmd in quick[:1] + more + quick[1:]:
        # this test runs inside the environment `uv run` made: the command without `uv run`
        args = [str(REPO / a) if a == "tests/data/images" else models.get(a, a) for a in cmd[3:]]
        if cmd[3] == "build":
            args += ["--size", "32", "--device", "cpu"]
        p = featstore(*args, cwd=tmp_path)
        if cmd[3] == "build":
            assert "encoded 4, skipped 0, failed 0" in p.stderr
    assert (tmp_path / "out" / "npy" / "renders" / "ring_mask.npy").exists()
    assert (tmp_path / "out" / "npy" / "landscape.json").exists()

    reading = _block("Read it from Python", "python")
    loader = _block("A training loader", "python").replace("num_workers=4", "num_workers=0").replace("...", "break")
    script = reading + "\n" + loader + "\nprint('labels', sorted(y.tolist()), sorted(keys))\n"
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("4 dinov2_patch_features ['landscape.jpg', 'renders/ring.png'")
    assert "labels [0, 1] ['renders/ring.png', 'renders/sphere_red.png']" in p.stdout


def _blocks_of_section(heading: str, lang: str) -> list[str]:
    start = README.index(heading)
    end = README.find("\n## ", start)
    return re.findall(rf"```{lang}\n(.*?)```", README[start:end], re.S)


def test_reading_from_other_tools_snippets_run(tmp_path, s3_server):
    """Every snippet of "Reading from other tools" runs as written, on a store with the quick
    start's keys (written directly: no model needed); the xarray and datasets ones on S3 too."""
    import os

    from featstore.store import open_store_writer
    from tests.store_helpers import make_batch, make_info

    keys = ["landscape.jpg", "renders/ring.png", "renders/sphere_red.png", "renders/torus.png"]
    info = make_info(embedding_dim=6)
    url = s3_server.url(f"{tmp_path.name}-dino.zarr")
    stores = [(tmp_path / "out" / "dino.zarr", {}), (tmp_path / "out" / "dino.h5", {}), (url, s3_server.options)]
    for where, opts in stores:
        with open_store_writer(where, info, overwrite=False, shard_rows=4, storage_options=opts) as w:
            w.write(make_batch(keys, info=info))
    blocks = _blocks_of_section("### Reading from other tools", "python")
    assert len(blocks) == 5  # xarray, dask, TensorStore, HDF5, datasets
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    s3 = f"storage_options={s3_server.options!r}"
    on_s3 = {
        0: blocks[0].replace('xr.open_zarr("out/dino.zarr", chunks=None)', f'xr.open_zarr("{url}", chunks=None, {s3})'),
        4: blocks[4].replace('to_hf_dataset("out/dino.zarr"', f'to_hf_dataset("{url}", {s3}'),
    }
    assert on_s3[0] != blocks[0] and on_s3[4].count(url) == 2
    for i, code in [*enumerate(blocks), *on_s3.items()]:
        p = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300
        )
        assert p.returncode == 0, f"snippet {i}:\n{code}\n{p.stderr[-3000:]}"


def test_ci_runs_the_readme_test_command_word_for_word():
    [command] = [line for line in _block("Run the tests", "bash").splitlines() if line.strip()]
    assert command.startswith("HF_HUB_OFFLINE=1 uv run ") and " pytest" in command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert any(line == command or line.startswith(command + " ") for line in ci), command
    assert "command -v uv" in (REPO / ".ci" / "run").read_text()  # a fresh machine gets uv first


def test_the_cli_help_and_the_package_description_name_every_family():
    import tomllib

    from featstore.models.family import FAMILIES

    description = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["description"]
    intro = README[: README.index("## Contents")]
    helptext = " ".join(featstore("--help").stdout.split())
    names = {"clip": "CLIP", "dinov2": "DINOv2", "dinov3": "DINOv3", "siglip": "SigLIP"}
    assert set(FAMILIES) == set(names)  # a new family: name it in all three places
    for text in (description, intro, helptext):
        assert all(n in text for n in names.values()) and "LAION" in text, text


def test_several_models_command_runs(tiny_models, tmp_path):
    """The command of "Several models from one decode", as written, with tiny models."""
    cmd = shlex.split(_block("### Several models from one decode", "bash").replace("\\\n", " "))
    assert cmd[:2] == ["featstore", "build"]
    models = {
        "dinov2-large": tiny_models["dino"],
        "ViT-L/14": tiny_models["clip"],
        "google/siglip-so400m-patch14-384": tiny_models["siglip"],
    }
    args: list[str] = []
    for a in cmd[1:]:
        args.append(str(REPO / "tests/data/images") if a == "renders/" else models.get(a, a))
        if a in models:  # the tiny models' own size, for the model it follows
            args += ["--size", "32"]
    p = featstore(*args, "--device", "cpu", cwd=tmp_path)
    assert "decoded 4 once for 3 models" in p.stderr, p.stderr
    for out in ("dino.zarr", "clip.zarr, clip_npy", "siglip.zarr"):
        assert f"{out}: encoded 4, skipped 0, failed 0" in p.stderr, p.stderr
    assert (tmp_path / "clip_npy" / "landscape.npy").exists()

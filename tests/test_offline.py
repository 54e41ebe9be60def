"""Offline use: `featstore prefetch` through the real huggingface_hub client (against a local
stand-in for the hub, tests/hub_server.py), builds from a Hugging Face cache laid out on
disk as the hub's client lays it out, with no hub request (HF_HUB_OFFLINE set, not set, and
the network unreachable), path-like --model values refused at once, and hub failures that
say whether offline mode is set and name the prefetch command."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import HubServer

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused at once
REPO_ID = "someorg/tiny-dino"


def _cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "featstore", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _env(hf_home: Path, endpoint: str, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", PYTHONPATH=str(REPO))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _build(model: str, store: Path, images: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _cli(
        "build", "-i", str(images), "-m", model, "--store", str(store), "--size", "32", "--device", "cpu", env=env
    )


def _hand_made_cache(hf_home: Path, repo: str, model: Path) -> Path:
    """A hub cache entry as huggingface_hub writes one: blobs named by their hash,
    snapshots/<commit>/ of relative symlinks to them, refs/main naming the commit."""
    entry = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (entry / "blobs").mkdir()
    for f in model.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, entry / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def served_model(tiny_models, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """The tiny DINOv2 folder plus files a build does not read, as a hub repo holds them."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_models["dino"], repo)
    (repo / "README.md").write_text("# a model card\n")
    (repo / "tokenizer.json").write_text("{}")
    (repo / "flax_model.msgpack").write_bytes(b"\0" * 64)
    return repo


def test_prefetch_fetches_exactly_what_a_build_reads_and_builds_then_ask_nothing(served_model, image_dir, tmp_path):
    hf_home = tmp_path / "hf"
    with HubServer({REPO_ID: served_model}) as hub:
        p = _cli("prefetch", REPO_ID, env=_env(hf_home, hub.url, offline=False))
        assert p.returncode == 0, p.stderr
        assert "HF_HUB_OFFLINE=1 featstore build --model someorg/tiny-dino" in p.stdout
        snapshot = hf_home / "hub" / "models--someorg--tiny-dino" / "snapshots" / hub.commits[REPO_ID]
        expected = sorted(f.name for f in Path(served_model).iterdir() if f.name.endswith((".json", ".safetensors")))
        expected.remove("tokenizer.json")
        assert sorted(f.name for f in snapshot.iterdir()) == expected  # config(s) and weights, nothing else
        assert (snapshot.parents[1] / "refs" / "main").read_text() == hub.commits[REPO_ID]
        fetched = [r for r in hub.requests if "/resolve/" in r and r.startswith("GET")]
        assert sorted(r.rsplit("/", 1)[1] for r in fetched) == expected

        hub.requests.clear()
        for offline, store in [(True, "a.zarr"), (False, "b.zarr")]:  # online: the cache is used as is
            p = _build(REPO_ID, tmp_path / store, image_dir, _env(hf_home, hub.url, offline))
            assert p.returncode == 0 and "encoded 5" in p.stderr, p.stderr
        assert hub.requests == []  # no hub request at all

        p = _cli("prefetch", REPO_ID, "--to", str(tmp_path / "dir"), env=_env(hf_home, hub.url, offline=False))
        assert p.returncode == 0, p.stderr
        assert sorted(f.name for f in (tmp_path / "dir").iterdir() if not f.name.startswith(".")) == expected
    # the folder's weights are the cache's: appending from it is accepted
    p = _build(str(tmp_path / "dir"), tmp_path / "a.zarr", image_dir, _env(hf_home, UNREACHABLE, offline=True))
    assert p.returncode == 0 and "encoded 0, skipped 5" in p.stderr, p.stderr


def test_a_build_from_a_hand_made_cache_needs_no_network(tiny_models, image_dir, tmp_path):
    hf_home = tmp_path / "hf"
    _hand_made_cache(hf_home, REPO_ID, Path(tiny_models["dino"]))
    with HubServer({}) as hub:
        p = _build(REPO_ID, tmp_path / "a.zarr", image_dir, _env(hf_home, hub.url, offline=False))
        assert p.returncode == 0 and "encoded 5" in p.stderr, p.stderr
        assert hub.requests == []
    # no HF_HUB_OFFLINE and the hub unreachable: the same
    p = _build(REPO_ID, tmp_path / "b.zarr", image_dir, _env(hf_home, UNREACHABLE, offline=False))
    assert p.returncode == 0 and "encoded 5" in p.stderr, p.stderr
    p = _build(REPO_ID, tmp_path / "c.zarr", image_dir, _env(hf_home, UNREACHABLE, offline=True))
    assert p.returncode == 0 and "encoded 5" in p.stderr, p.stderr


@pytest.mark.parametrize("offline", [True, False])
def test_a_model_not_in_the_cache_says_whether_offline_is_set_and_names_prefetch(image_dir, tmp_path, offline):
    p = _build(REPO_ID, tmp_path / "a.zarr", image_dir, _env(tmp_path / "hf", UNREACHABLE, offline))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    [line] = p.stderr.strip().splitlines()
    assert line.startswith("featstore: error: cannot load model 'someorg/tiny-dino'")
    assert ("HF_HUB_OFFLINE is set" if offline else "HF_HUB_OFFLINE is not set") in line
    assert "`featstore prefetch someorg/tiny-dino`" in line


def test_a_path_like_model_that_does_not_exist_is_refused_without_asking_the_hub(tiny_models, image_dir, tmp_path):
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    shutil.copytree(tiny_models["dino"], work / "models" / "dinov2-small-local")
    with HubServer({}) as hub:
        env = _env(tmp_path / "hf", hub.url, offline=False)
        for model in ["models/dinov2-smal-local", "./models/dinov2-smal-local"]:
            p = _cli("build", "-i", str(image_dir), "-m", model, "--npy-dir", "out", env=env, cwd=work)
            assert p.returncode == 2
            [line] = p.stderr.strip().splitlines()
            assert line.startswith(f"featstore: error: model path {model!r} does not exist"), line
            assert f"did you mean {str(work / 'models' / 'dinov2-small-local')!r}" in line
        assert hub.requests == []
        assert not (work / "out").exists()


def test_prefetch_refuses_a_local_path_and_offline_mode(tiny_models, tmp_path):
    p = _cli("prefetch", tiny_models["dino"], env=_env(tmp_path / "hf", UNREACHABLE, offline=False))
    assert p.returncode == 2 and "is a local path" in p.stderr
    p = _cli("prefetch", REPO_ID, env=_env(tmp_path / "hf", UNREACHABLE, offline=True))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "featstore: error: HF_HUB_OFFLINE is set: prefetch downloads, so run it where the hub can be reached"
    ]

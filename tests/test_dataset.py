"""FeatureDataset: items, joins by key, labels, and DataLoader workers under fork and spawn."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featstore.store import open_store_writer
from featstore.torch import FeatureDataset
from tests.store_helpers import make_batch, make_info, row_values

CLIP_KEYS = [f"k{i:02d}.png" for i in range(40)]
DINO_KEYS = [f"k{i:02d}.png" for i in range(44, 4, -1)]  # k44..k05: overlaps, other order


def _write(path: Path, keys: list[str], **info: object) -> Path:
    encoding = make_info(**info)
    with open_store_writer(path, encoding, overwrite=False, shard_rows=8) as w:
        for s in range(0, len(keys), 7):
            w.write(make_batch(keys[s : s + 7], info=encoding))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ds")
    return {
        "clip": _write(d / "clip.zarr", CLIP_KEYS),
        "dino": _write(
            d / "dino.h5",
            DINO_KEYS,
            family="dinov2",
            feature_type="dinov2_patch_features",
            grid=2,
            hidden_dim=8,
            model="facebook/dinov2-small",
            model_source={"kind": "hf", "id": "facebook/dinov2-small", "revision": "y"},
        ),
    }


def test_single_store_items(stores: dict[str, Path]) -> None:
    ds = FeatureDataset(stores["clip"])
    assert len(ds) == 40 and ds.keys == CLIP_KEYS
    item = ds[3]
    feats, mask, _ = row_values("k03.png")
    assert item["key"] == "k03.png" and set(item) == {"key", "features", "mask"}
    assert item["features"].dtype == torch.float16 and item["mask"].dtype == torch.uint8
    np.testing.assert_array_equal(item["features"].numpy(), feats)
    np.testing.assert_array_equal(item["mask"].numpy(), mask)
    assert ds[-1]["key"] == "k39.png"
    with pytest.raises(IndexError):
        ds[40]
    items = ds.__getitems__([5, 1, 5])
    assert [x["key"] for x in items] == ["k05.png", "k01.png", "k05.png"]
    f32 = FeatureDataset(stores["clip"], with_mask=False, dtype=torch.float32)[0]
    assert "mask" not in f32 and f32["features"].dtype == torch.float32
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy[3]["features"].numpy(), feats)


def test_join_two_stores_by_key(stores: dict[str, Path]) -> None:
    ds = FeatureDataset({"clip": stores["clip"], "dino": stores["dino"]})
    assert ds.keys == CLIP_KEYS[5:]  # the intersection, in the first store's order
    item = ds[0]
    assert item["key"] == "k05.png" and set(item["features"]) == {"clip", "dino"}
    assert item["features"]["clip"].shape == (16, 4, 4) and item["features"]["dino"].shape == (8, 2, 2)
    np.testing.assert_array_equal(item["features"]["dino"].numpy(), row_values("k05.png", 8, 2)[0])
    np.testing.assert_array_equal(item["mask"]["dino"].numpy(), row_values("k05.png", 8, 2)[1])
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["features"]["dino"].shape == (4, 8, 2, 2) and batch["key"] == CLIP_KEYS[5:9]

    listed = FeatureDataset([stores["clip"], stores["dino"]], keys=["k20.png", "k07.png"])
    assert listed.keys == ["k20.png", "k07.png"] and set(listed[1]["features"]) == {"clip", "dino"}
    with pytest.raises(KeyError, match=r"not in store 'dino'.*k01\.png"):
        FeatureDataset([stores["clip"], stores["dino"]], keys=["k20.png", "k01.png"])


def test_labels(stores: dict[str, Path]) -> None:
    labels = {k: i % 3 for i, k in enumerate(CLIP_KEYS)}
    ds = FeatureDataset(stores["clip"], labels=labels)
    assert ds[4]["label"] == 1 and len(ds) == 40
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["label"].tolist() == [0, 1, 2, 0, 1]
    subset = FeatureDataset(stores["clip"], labels={"k09.png": "cat", "k02.png": "dog"})
    assert subset.keys == ["k02.png", "k09.png"] and subset[1]["label"] == "cat"
    with pytest.raises(KeyError, match="no label"):
        FeatureDataset(stores["clip"], keys=["k01.png", "k02.png"], labels={"k01.png": 0})
    with pytest.raises(KeyError, match=r"not in store"):
        FeatureDataset(stores["clip"], labels={"k01.png": 0, "elsewhere.png": 1})


@pytest.mark.parametrize(("context", "store"), [("fork", "clip"), ("fork", "dino"), ("spawn", "joined")])
def test_dataloader_workers_read_every_row_once(stores: dict[str, Path], context: str, store: str) -> None:
    path = stores if store == "joined" else stores[store]
    ds = FeatureDataset(path)

    def clip_or_only(features: object) -> torch.Tensor:
        return features["clip"] if store == "joined" else features  # type: ignore[index,return-value]

    before = clip_or_only(ds[0]["features"])  # the parent reads first: TensorStore is in use before the fork
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context=context)
    seen: list[str] = []
    for batch in loader:
        seen += batch["key"]
        feats = clip_or_only(batch["features"])
        for j, key in enumerate(batch["key"]):
            want = row_values(key, 8, 2) if store == "dino" else row_values(key)
            np.testing.assert_array_equal(feats[j].numpy(), want[0])
    assert sorted(seen) == sorted(ds.keys) and len(seen) == len(ds)
    assert torch.equal(clip_or_only(ds[0]["features"]), before)  # the parent still reads


WORKER_ENGINES = """
import sys
from torch.utils.data import DataLoader
from featstore.torch import FeatureDataset

def engines(ds):
    ds.__getitems__([0, 1])  # the main process reads first
    loader = DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="fork",
                        collate_fn=lambda batch: ds._open()["clip"].engine)
    return sorted(set(loader)), ds._open()["clip"].engine

# featstore's own layout: read by byte offset everywhere
print(*engines(FeatureDataset(sys.argv[1])))
# TensorStore in the main process: its forked workers must not use it, and fall back
print(*engines(FeatureDataset(sys.argv[1], engine=("tensorstore", "zarr"))))
"""


def test_engines_in_forked_workers(stores: dict[str, Path]) -> None:
    """In a fresh process, so that no earlier test has used TensorStore in this one."""
    import subprocess
    import sys

    pytest.importorskip("tensorstore")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", WORKER_ENGINES, str(stores["clip"])], cwd=repo, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["['direct'] direct", "['zarr'] tensorstore"]


def test_embeddings_in_items_and_export(tmp_path: Path) -> None:
    from featstore.convert import export_npy
    from tests.store_helpers import embedding_values

    info = make_info(embedding_dim=6)
    path = tmp_path / "emb.zarr"
    keys = CLIP_KEYS[:10]
    with open_store_writer(path, info, overwrite=False, shard_rows=4) as w:
        w.write(make_batch(keys, info=info))
    ds = FeatureDataset(path, with_embedding=True)
    item = ds[2]
    assert item["embedding"].dtype == torch.float32
    np.testing.assert_array_equal(item["embedding"].numpy(), embedding_values(keys[2], 6))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["embedding"].shape == (4, 6)
    assert "embedding" not in FeatureDataset(path)[0]
    with pytest.raises(ValueError, match="holds no embeddings"):
        FeatureDataset(_write(tmp_path / "plain.zarr", keys), with_embedding=True)
    result = export_npy(path, tmp_path / "out", save_meta=False, embedding=True)
    assert result.written == 10
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "k03_embedding.npy"), embedding_values("k03.png", 6))
    assert np.load(tmp_path / "out" / "k03.npy").shape == (16, 4, 4)

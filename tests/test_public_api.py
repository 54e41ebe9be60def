"""The public surface: pinned, and the reader does not pull in torch."""

import subprocess
import sys

import featstore


def test_public_names_are_pinned():
    assert featstore.__all__ == [
        "BuildOptions",
        "BuildResult",
        "FeatureDataset",
        "FeatureStore",
        "Row",
        "RowBatch",
        "Target",
        "__version__",
        "build",
        "open",
    ]
    for name in featstore.__all__:
        assert getattr(featstore, name) is not None


def test_reading_a_store_does_not_import_torch(tmp_path):
    code = (
        "import sys, featstore\n"
        "try:\n    featstore.open(sys.argv[1])\nexcept featstore.errors.StoreError:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "none.zarr")], check=True)

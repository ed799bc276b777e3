"""Shared fixtures: paths to the real sample data and small manifests built from it."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = DATA / "hippocampus"


def pytest_configure(config: pytest.Config) -> None:
    # The suite runs in parallel workers (`pytest -n 2` on 2 cores): one torch thread each avoids
    # oversubscription, which makes small-model steps orders of magnitude slower.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not DATA.is_dir():
        skip = pytest.mark.skip(reason=f"real sample data not found at {DATA}")
        for item in items:
            if "real_data" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def hippo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of 16 real hippocampus MRI crops."""
    from medmae.data.manifest import write_manifest
    from medmae.data.msd import records_from_msd

    records = records_from_msd(HIPPO / "dataset.json")[:16]
    return write_manifest(records, tmp_path_factory.mktemp("manifest") / "hippo16.jsonl")

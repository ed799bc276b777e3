"""Input channels of a training run: taken from the manifest when the model does not set them, checked when it does.

A manifest record lists one file per channel (or one 4D file holding several), so a multi-sequence MRI archive
has 2+ channels per scan. Without this, a model built for the preset's single channel would only fail at its
first batch, with a tensor-shape error that names neither the manifest nor the option to set.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from medmae.data.channels import first_scan_channels
from medmae.data.manifest import ScanRecord
from medmae.models.vit import ViT3DEncoder


def describe(record: ScanRecord, channels: int) -> str:
    """``"3 channel(s) per scan (first scan 'id': a.nii.gz, b.nii.gz, c.nii.gz)"``."""
    files = ", ".join(path.rsplit("/", 1)[-1] for path in record.image)
    return f"{channels} channel(s) per scan (first scan {record.id!r}: {files})"


def take_channels_from_manifest(config: Any, command: str) -> tuple[int, ScanRecord] | None:
    """Set ``config.model.in_channels`` from ``config.data.manifest`` when it is None (the preset's single
    channel otherwise); a model option that names another count raises a ValueError naming both. Returns what
    :func:`first_scan_channels` found (None: no manifest, or nothing readable), for :func:`check_model_channels`.

    ``command`` (e.g. ``"medmae pretrain"``) starts the note printed for a multi-channel manifest. ``config`` is a
    parsed LightningCLI namespace; a model without an ``in_channels`` option (restoration,
    whose checkpoint fixes it) is left as it is and checked after it is built (:func:`check_model_channels`).
    """
    model, data = config.get("model"), config.get("data")
    if model is None or data is None or not data.get("manifest"):
        return None
    found = first_scan_channels(str(data.manifest), data.get("cache_dir"))
    if found is None or "in_channels" not in model:
        return found
    channels, record = found
    if model.in_channels is None:
        model.in_channels = channels
        if channels != 1:
            print(f"{command}: {channels} input channels, as in {data.manifest}")
    elif int(model.in_channels) != channels:
        raise ValueError(
            f"{data.manifest}: {describe(record, channels)}, but --model.in_channels is {model.in_channels}; "
            f"set --model.in_channels {channels} or leave it out to take the manifest's"
        )
    return found


def model_in_channels(module: nn.Module) -> int | None:
    """The input channels of a task's model: its config's, or its first ViT encoder's; None if it has neither."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "in_channels", None) is not None:
        return int(config.in_channels)
    return next((encoder.in_channels for encoder in module.modules() if isinstance(encoder, ViT3DEncoder)), None)


def check_model_channels(module: nn.Module, found: tuple[int, ScanRecord] | None, manifest: str, source: str) -> None:
    """Raise a ValueError when the built model takes another number of channels than the manifest's scans hold.

    ``found`` is what :func:`take_channels_from_manifest` returned for ``manifest``; ``source`` says where the
    model's count came from (e.g. its pretrained checkpoint), for the message.
    """
    expected = model_in_channels(module)
    if expected is None or found is None or found[0] == expected:
        return
    channels, record = found
    raise ValueError(f"{manifest}: {describe(record, channels)}, but {source} takes {expected} channel(s)")

"""Issue 7, hardening: one readable line for a bad LightningCLI key, symbolic links in an archive, the memory
budget set through ``MEDMAE_MAX_VOXELS``, and unreadable files also when the tests run as root."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medmae.cli import main
from medmae.data.datamodule import PretrainDataModule
from medmae.data.manifest import read_manifest
from medmae.io import read_volume
from tests import test_bad_inputs
from tests.test_bad_inputs import assert_one_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIPPO = sorted((DATA / "hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[:4]
MEDMAE = Path(sys.executable).parent / "medmae"
# (command, config, a key of its config that exists)
COMMANDS = [
    ("pretrain", "configs/pretrain/tiny.yaml", "model.mask_ratio"),
    ("finetune", "configs/segment/tiny.yaml", "data.roi_size"),
    ("finetune-restore", "configs/restore/tiny.yaml", "data.roi_size"),
]

pytestmark = pytest.mark.real_data
ckpt = test_bad_inputs.ckpt  # the fixture: a tiny untrained MAE checkpoint


def _typo(key: str) -> str:
    """``model.mask_ratio`` → ``model.mask_raito``: two letters of the last part swapped."""
    group, _, name = key.rpartition(".")
    return f"{group}.{name[:-3]}{name[-2]}{name[-3]}{name[-1]}"


@pytest.mark.parametrize(("command", "config", "key"), COMMANDS)
def test_unknown_key_on_the_command_line_is_one_line_with_the_closest_key(command, config, key, tmp_path, capsys):
    code = main(
        [command, "--config", str(ROOT / config), "--trainer.default_root_dir", str(tmp_path), f"--{_typo(key)}", "1"]
    )
    err = capsys.readouterr().err
    assert_one_line(code, err, f"{command}: unknown key {_typo(key)}", f"did you mean {key}?")
    assert "usage:" not in err


@pytest.mark.parametrize(("command", "config", "key"), COMMANDS)
def test_unknown_key_in_a_config_file_names_the_file_and_the_closest_key(command, config, key, tmp_path, capsys):
    name = key.split(".")[-1]
    text = (ROOT / config).read_text()
    assert f"  {name}:" in text
    typo_config = tmp_path / "typo.yaml"
    typo_config.write_text(text.replace(f"  {name}:", f"  {_typo(key).split('.')[-1]}:", 1))
    code = main([command, "--config", str(typo_config), "--trainer.default_root_dir", str(tmp_path)])
    assert_one_line(code, capsys.readouterr().err, f"{typo_config}: unknown key {_typo(key)}", f"did you mean {key}?")


def test_other_config_errors_are_one_line(tmp_path: Path, capsys) -> None:
    tiny = str(ROOT / "configs" / "pretrain" / "tiny.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  preset: tiny\n  patch_size: [8\n")
    cases = [
        ([tiny, "--trainer.logger.init_args.save_dirr", "x"], ["did you mean trainer.logger.init_args.save_dir?"]),
        ([tiny, "--model.mask_ratio", "abc"], ["model.mask_ratio", "expected a float", "abc"]),
        ([str(broken)], [str(broken), "not valid YAML", "line 4"]),
        ([str(tmp_path / "missing.yaml")], ["missing.yaml", "does not exist"]),
    ]
    for args, words in cases:
        code = main(["pretrain", "--config", *args, "--trainer.default_root_dir", str(tmp_path)])
        assert_one_line(code, capsys.readouterr().err, *words)


def test_archive_with_symbolic_link_loops_and_dangling_links_is_scanned_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy2(HIPPO[0], root / "a" / "b" / "scan.nii.gz")
    (root / "a" / "b" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    (root / "a" / "b_link").symlink_to("b", target_is_directory=True)
    (root / "a" / "dangling.nii.gz").symlink_to(root / "nowhere.nii.gz")
    (root / "self.nii.gz").symlink_to(root / "self.nii.gz")
    (root / "linked.nii.gz").symlink_to(HIPPO[1])  # a link to a file is read as the file
    output = tmp_path / "out" / "archive.jsonl"
    assert main(["manifest", "scan", str(root), "-o", str(output), "--no-progress"]) == 0
    report = json.loads(output.with_name("archive.report.json").read_text())
    codes = {issue["item"]: issue["code"] for issue in report["issues"]}
    assert codes == {
        "a/b/up": "symlink-loop",
        "a/b_link": "folder-link",
        "a/dangling.nii.gz": "dangling-link",
        "self.nii.gz": "symlink-loop",
    }
    assert all(issue["reason"] and str(tmp_path) not in issue["reason"] for issue in report["issues"])
    assert sorted(record.id for record in read_manifest(output)) == ["a__b__scan", "linked"]
    assert report["counts"] == {"ok": 2, "skipped": 4}


def test_memory_budget_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    voxels = read_volume(HIPPO[0]).array.size
    monkeypatch.setenv("MEDMAE_MAX_VOXELS", "1000")
    with pytest.raises(ValueError, match=f"above the memory budget of 1e.03 voxels.*MEDMAE_MAX_VOXELS={voxels} "):
        read_volume(HIPPO[0])
    with pytest.raises(ValueError, match="above the memory budget") as refusal:
        read_volume(HIPPO[0], max_voxels=1000)  # a budget given in code: the variable would not change it
    assert "MEDMAE_MAX_VOXELS" not in str(refusal.value)
    for value in (str(voxels), f"{voxels:.6e}", "none", "1_000_000"):
        monkeypatch.setenv("MEDMAE_MAX_VOXELS", value)
        assert read_volume(HIPPO[0]).array.size == voxels
    for value in ("lots", "0", "-5", "2.5", "inf"):
        monkeypatch.setenv("MEDMAE_MAX_VOXELS", value)
        with pytest.raises(ValueError, match=f"MEDMAE_MAX_VOXELS='{value}' is not a memory budget.*positive whole"):
            read_volume(HIPPO[0])
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": "h", "image": str(HIPPO[0]), "modality": "MR"}) + "\n")
    capsys.readouterr()
    code = main(["preprocess", str(tmp_path / "one.jsonl"), "--cache", str(tmp_path / "cache"), "--no-progress"])
    assert_one_line(code, capsys.readouterr().err, "MEDMAE_MAX_VOXELS='inf'")


def test_scans_above_the_budget_are_skipped_by_archive_paths_and_refused_by_denoise(
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys,
) -> None:
    voxels = {path.name.split(".")[0]: read_volume(path).array.size for path in HIPPO}
    budget = sorted(voxels.values())[1]
    too_big = sorted(scan_id for scan_id, n in voxels.items() if n > budget)
    assert 0 < len(too_big) < len(HIPPO)
    manifest = tmp_path / "scans.jsonl"
    rows = [{"id": path.name.split(".")[0], "image": str(path), "modality": "MR"} for path in HIPPO]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv("MEDMAE_MAX_VOXELS", str(budget))

    assert main(["preprocess", str(manifest), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{len(HIPPO) - len(too_big)} built, 0 reused, {len(too_big)} failed" in out
    for scan_id in too_big:
        assert f"failed {scan_id}: " in out and f"set MEDMAE_MAX_VOXELS={voxels[scan_id]}" in out

    data = PretrainDataModule(str(manifest), roi_size=[16, 16, 16], spacing=None, val_fraction=0.0)
    data.setup("fit")
    assert sorted(scan_id for scan_id, _ in data.skipped) == too_big
    assert all("MEDMAE_MAX_VOXELS" in reason for _, reason in data.skipped)
    assert len(data.train_dataset.volumes) == len(HIPPO) - len(too_big)

    archive, found = tmp_path / "archive", tmp_path / "found" / "archive.jsonl"
    archive.mkdir()
    for path in HIPPO:
        shutil.copy2(path, archive / path.name)
    assert main(["manifest", "scan", str(archive), "-o", str(found), "--no-progress"]) == 0
    report = json.loads(found.with_name("archive.report.json").read_text())
    assert sorted(issue["item"].split(".")[0] for issue in report["issues"]) == too_big
    assert all("MEDMAE_MAX_VOXELS=" in issue["reason"] for issue in report["issues"])
    monkeypatch.setenv("MEDMAE_MAX_VOXELS", "none")  # a larger budget: the refused files are read again
    assert main(["manifest", "scan", str(archive), "-o", str(found), "--no-progress"]) == 0
    report = json.loads(found.with_name("archive.report.json").read_text())
    assert report["files"] == {"seen": len(HIPPO), "read": len(too_big), "reused": len(HIPPO) - len(too_big)}
    assert len(read_manifest(found)) == len(HIPPO)
    monkeypatch.setenv("MEDMAE_MAX_VOXELS", str(budget))

    scan = next(path for path in HIPPO if path.name.split(".")[0] in too_big)
    output = tmp_path / "denoised.nii.gz"
    code = main(["denoise", str(scan), "-o", str(output), "--ckpt", str(ckpt)])
    assert_one_line(code, capsys.readouterr().err, str(scan), "memory budget", "MEDMAE_MAX_VOXELS=")
    assert not output.exists()


def _unreadable_copy(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "unreadable.nii.gz"
    shutil.copy2(HIPPO[0], path)
    path.chmod(0)
    return path


def test_unreadable_file_message_without_file_permissions_also_as_root(
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys,
) -> None:
    """The kernel's refusal made in-process, whoever runs the tests: opening the file raises EACCES."""
    path = _unreadable_copy(tmp_path / "archive")
    read_bytes = pathlib.Path.read_bytes

    def denied(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return read_bytes(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(ValueError, match="permission denied; medmae needs read access"):
        read_volume(path)
    code = main(["denoise", str(path), "-o", str(tmp_path / "out.nii.gz"), "--ckpt", str(ckpt)])
    assert_one_line(code, capsys.readouterr().err, str(path), "permission denied")


@pytest.mark.skipif(os.geteuid() != 0, reason="as a user, test_bad_inputs.py makes a real unreadable file")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is needed to drop root's access")
def test_unreadable_file_as_root_without_the_capability_to_read_anything(
    ckpt: Path,
    tmp_path: Path,
) -> None:
    """Root reads any file through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH: dropped, root is refused a chmod-0 file."""
    path = _unreadable_copy(tmp_path / "archive")
    shutil.copy2(HIPPO[1], tmp_path / "archive" / "readable.nii.gz")
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    if subprocess.run([*drop, "cat", str(path)], capture_output=True).returncode == 0:
        pytest.skip("this container does not let root drop its capabilities")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    output = tmp_path / "out.nii.gz"
    denoise = [str(MEDMAE), "denoise", str(path), "-o", str(output), "--ckpt", str(ckpt)]
    result = subprocess.run([*drop, *denoise], capture_output=True, text=True, env=env, timeout=300)
    assert_one_line(result.returncode, result.stderr, str(path), "permission denied")
    assert not output.exists()
    manifest = tmp_path / "out" / "archive.jsonl"
    scan = [str(MEDMAE), "manifest", "scan", str(tmp_path / "archive"), "-o", str(manifest), "--no-progress"]
    result = subprocess.run([*drop, *scan], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    issues = json.loads(manifest.with_name("archive.report.json").read_text())["issues"]
    assert [(issue["item"], issue["code"]) for issue in issues] == [("unreadable.nii.gz", "unreadable")]
    assert "permission denied" in issues[0]["reason"]
    assert [record.id for record in read_manifest(manifest)] == ["readable"]

"""Atomic writes: complete or absent, and on the disk (flushed) before and after the rename that publishes them."""

import os

import pytest

from tckr.core import atomic

pytestmark = pytest.mark.unit


@pytest.fixture
def flushed(monkeypatch) -> list[str]:
    """What each fsync flushed, in order (the path its descriptor is open on)."""
    calls: list[str] = []
    real = os.fsync

    def record(descriptor: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real(descriptor)

    monkeypatch.setattr(atomic.os, "fsync", record)
    return calls


def test_a_file_is_flushed_before_its_rename_and_the_folder_after(tmp_path, flushed):
    target = tmp_path / "manifest.json"
    atomic.write_text(target, "{}\n")
    assert target.read_text() == "{}\n" and not list(tmp_path.glob("*.partial"))
    assert flushed == [str(tmp_path / "manifest.json.partial"), str(tmp_path)]


def test_a_failed_write_leaves_nothing_and_flushes_nothing(tmp_path, flushed):
    target = tmp_path / "weights.bin"
    with pytest.raises(OSError, match="disk full"), atomic.atomic_path(target) as partial:
        partial.write_bytes(b"half")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == [] and flushed == []


def test_a_copied_tree_is_flushed_file_by_file_then_published(tmp_path, flushed):
    source = tmp_path / "source"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "weights.bin").write_bytes(b"w")
    (source / "card.json").write_text("{}")
    target = tmp_path / "copy"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    atomic.copy_tree(source, target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["card.json", "unet", "unet/weights.bin"]
    partial = tmp_path / "copy.partial"
    assert set(flushed[:-1]) == {str(partial / "unet" / "weights.bin"), str(partial / "unet"),
                                 str(partial / "card.json"), str(partial)}
    assert flushed.index(str(partial / "unet" / "weights.bin")) < flushed.index(str(partial / "unet"))
    assert flushed[-1] == str(tmp_path)


def test_a_full_disk_is_one_line_and_anything_else_passes_through():
    said = r"^no space left on the device writing /out/shard during stage generate_shard: free some"
    with pytest.raises(atomic.DiskFullError, match=said), atomic.disk_full_as_error("generate_shard"):
        raise OSError(28, "No space left on device", "/out/shard")
    with pytest.raises(atomic.DiskFullError), atomic.disk_full_as_error("generate_shard"):
        raise OSError("[Errno 28] Error writing bytes to file")  # pyarrow's, errno in its text only
    with pytest.raises(PermissionError), atomic.disk_full_as_error("generate_shard"):
        raise PermissionError(13, "Permission denied")

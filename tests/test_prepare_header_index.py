"""The persistent header index (lungct.prepare.header_index): reuse, invalidation, privacy."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless

from lungct import contract
from lungct.prepare import dicom, header_index
from lungct.prepare.cli import main
from lungct.prepare.dicom_files import UnusableFileError
from lungct.prepare.executors import LocalExecutor
from lungct.prepare.header_index import INDEX_NAME, index_path, read_headers

pq = pytest.importorskip("pyarrow.parquet")

HU = np.full((8, 8), -800.0)


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two CT slices, one MR image, one text file (sorted paths)."""
    root = tmp_path / "input"
    write_ct_slice(root / "a.dcm", HU, 0.0, instance_number=1)
    write_ct_slice(root / "b.dcm", HU, 2.5, instance_number=2)
    write_ct_slice(root / "mr.dcm", HU, 0.0, modality="MR")
    (root / "notes.txt").write_text("not a slice")
    return root, sorted(root.iterdir())


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path dicom.read_header is called with (inline executor: same process)."""
    calls: list[Path] = []
    real = dicom.read_header

    def counting(path: Path) -> dicom.SliceHeader:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(dicom, "read_header", counting)
    return calls


def _read(root: Path, files: list[Path], index: Path | None) -> list:
    return read_headers(files, root, LocalExecutor(1), index)


def test_second_read_opens_no_file_and_gives_equal_headers_and_reasons(tree, tmp_path,
                                                                      count_reads):
    """Headers and skip reasons come back from the index equal to a fresh read."""
    root, files = tree
    index = index_path(tmp_path)
    first = _read(root, files, index)
    assert len(count_reads) == 4
    assert index.name == INDEX_NAME and index.is_file()
    second = _read(root, files, index)
    assert len(count_reads) == 4  # nothing read again
    assert second == first
    assert isinstance(second[0], dicom.SliceHeader) and second[0].path == files[0]
    assert second[0].position_mm == (-100.0, -100.0, 0.0)
    assert second[0].orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert second[2] == "not a CT image ((0008,0060) Modality MR)"
    assert second[3] == "not DICOM"


def test_index_rows_hold_what_decides_decoding(tmp_path):
    """Transfer syntax, SOP class, image type, bits, signedness, rescale, padding and the
    pixel data's file offset are columns of the index, for native and compressed files."""
    root = tmp_path / "input"
    native = write_ct_slice(root / "native.dcm", HU, 0.0, slope=0.5, intercept=-1000.0,
                            padding_value=-3000)
    rle = write_ct_slice(root / "rle.dcm", HU, 2.5, instance_number=2)
    ds = pydicom.dcmread(rle)
    ds.compress(RLELossless)
    ds.save_as(rle)
    index = index_path(tmp_path)
    _read(root, [native, rle], index)
    rows = {Path(os.fsdecode(row["path"])).name: row
            for row in pq.read_table(index).to_pylist()}
    assert rows["native.dcm"]["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert rows["rle.dcm"]["transfer_syntax_uid"] == RLELossless
    for row in rows.values():
        assert (row["sop_class_uid"], row["modality"]) == (CTImageStorage, "CT")
        assert row["image_type"] == "ORIGINAL\\PRIMARY\\AXIAL"
        assert (row["bits_allocated"], row["bits_stored"], row["signed"]) == (16, 16, True)
        assert (row["number_of_frames"], row["burned_in_annotation"]) == (1, "")
    native_row = rows["native.dcm"]
    assert (native_row["rescale_slope"], native_row["rescale_intercept_hu"]) == (0.5, -1000.0)
    assert (native_row["padding_low"], native_row["padding_high"]) == (-3000, -3000)
    assert rows["rle.dcm"]["padding_low"] is None
    offset = native_row["pixel_data_offset_bytes"]
    pixel_bytes = pydicom.dcmread(native).PixelData
    assert native.read_bytes()[offset:offset + len(pixel_bytes)] == pixel_bytes
    rle_offset = rows["rle.dcm"]["pixel_data_offset_bytes"]
    assert rle.read_bytes()[rle_offset:rle_offset + 4] == b"\xfe\xff\x00\xe0"  # first Item tag


def test_changed_file_is_read_again(tree, tmp_path, count_reads):
    """A new mtime_ns (or size, ctime_ns, inode, device) makes its row stale; the others
    are reused."""
    root, files = tree
    index = index_path(tmp_path)
    _read(root, files, index)
    stat = files[1].stat()
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    count_reads.clear()
    _read(root, files, index)
    assert count_reads == [files[1]]


def test_rewrite_with_the_same_size_and_mtime_is_read_again(tree, tmp_path, count_reads):
    """A file rewritten in place (same inode, same size) with its mtime set back, as
    ``cp -p`` or ``rsync -t`` do, still has a new ctime_ns: its header is read again."""
    root, files = tree
    index = index_path(tmp_path)
    assert _read(root, files, index)[2] == "not a CT image ((0008,0060) Modality MR)"
    mr = files[2]
    before = mr.stat()
    modality = b"\x08\x00\x60\x00CS\x02\x00"  # (0008,0060) CS, length 2, explicit VR LE
    data = mr.read_bytes()
    assert data.count(modality + b"MR") == 1
    with open(mr, "r+b") as handle:  # in place: the inode is kept
        handle.write(data.replace(modality + b"MR", modality + b"CT"))
    os.utime(mr, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = mr.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)
    count_reads.clear()
    again = _read(root, files, index)
    assert count_reads == [mr]
    assert isinstance(again[2], dicom.SliceHeader) and again[2].path == mr
    table = pq.read_table(index)
    assert table.column_names[1:6] == list(header_index.STAT_COLUMNS)
    row = table.column("path").to_pylist().index(os.fsencode(mr))
    assert [table.column(name)[row].as_py() for name in header_index.STAT_COLUMNS] == [
        after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino, after.st_dev]


def test_rows_of_deleted_files_are_dropped_and_other_trees_kept(tree, tmp_path):
    """Rewriting keeps rows outside the input folder and drops rows of files gone from it."""
    root, files = tree
    other = tmp_path / "other"
    other_file = write_ct_slice(other / "c.dcm", HU, 0.0)
    index = index_path(tmp_path)
    _read(other, [other_file], index)
    _read(root, files, index)
    _read(root, files[1:], index)
    paths = {os.fsdecode(p) for p in pq.read_table(index).column("path").to_pylist()}
    assert paths == {str(other_file), *map(str, files[1:])}


def test_other_rules_or_corrupt_index_read_every_header(tree, tmp_path, count_reads,
                                                       monkeypatch, caplog):
    """An index made by other header rules, or unreadable, is rebuilt from the files."""
    root, files = tree
    index = index_path(tmp_path)
    _read(root, files, index)
    monkeypatch.setattr(header_index, "rules_digest", lambda: "other rules")
    count_reads.clear()
    _read(root, files, index)
    assert len(count_reads) == 4
    index.write_bytes(b"PAR1 broken")
    count_reads.clear()
    with caplog.at_level(logging.WARNING):
        assert _read(root, files, index)[2] == "not a CT image ((0008,0060) Modality MR)"
    assert len(count_reads) == 4
    assert "is unreadable (ArrowInvalid): reading every header again" in caplog.text
    assert pq.read_table(index).num_rows == 4


def test_transient_read_errors_are_not_remembered(tree, tmp_path, monkeypatch):
    """An I/O failure may pass: its file is read again next time."""
    root, files = tree

    def refused(path: Path) -> dicom.SliceHeader:
        raise UnusableFileError("unreadable DICOM (PermissionError)")

    monkeypatch.setattr(dicom, "read_header", refused)
    index = index_path(tmp_path)
    assert _read(root, files, index) == ["unreadable DICOM (PermissionError)"] * 4
    assert not index.exists()


def test_without_pyarrow_every_header_is_read_and_nothing_written(tree, tmp_path, monkeypatch,
                                                                  count_reads, caplog):
    """The index needs the lungct[dask] extra; without it prepare reads headers as before."""
    root, files = tree
    monkeypatch.setattr(header_index, "_pyarrow", lambda: None)
    index = index_path(tmp_path)
    with caplog.at_level(logging.INFO):
        _read(root, files, index)
        _read(root, files, index)
    assert len(count_reads) == 8 and not index.exists()
    assert "no header index without pyarrow (pip install 'lungct[dask]')" in caplog.text


SYNTHETIC = ["--source", "synthetic", "--synthetic-patients", "6", "--synthetic-size", "64",
             "--workers", "1", "--quiet"]


def test_second_prepare_with_other_settings_reads_no_header(tmp_path, count_reads):
    """The index serves a prepare with other settings; it stays out of output_dataset/."""
    output, work = tmp_path / "output_dataset", tmp_path / "work"
    common = [*SYNTHETIC, "--output", str(output), "--work-dir", str(work)]
    assert main([*common, "--image-size", "32"]) == 0
    assert len(count_reads) == 314  # every DICOM file of the cohort, once
    count_reads.clear()
    assert main([*common, "--image-size", "48", "--overwrite"]) == 0
    assert count_reads == []
    info = json.loads((output / contract.DATASET_FILE).read_text())
    assert info["image_size"] == 48
    assert (work / INDEX_NAME).is_file()
    assert not any(p.suffix == ".parquet" for p in output.rglob("*"))
    assert not any(".parquet" in name for name in info["files_sha256"])

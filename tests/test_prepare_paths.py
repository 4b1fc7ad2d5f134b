"""Hostile paths and names: prepare creates and deletes only what it should, and never crashes.

Each case snapshots the whole tmp_path tree (every path, links not followed, with inode, size
and modification time) before and after, and checks that nothing outside the intended target
was created, deleted or modified.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import pathlib
import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lungct.errors import UserError
from lungct.prepare.archives import extract_archive, extraction_folder, marker_path
from lungct.prepare.cli import main
from lungct.prepare.header_index import INDEX_NAME
from lungct.prepare.sources import resolve_source
from lungct.synthetic.cohort import generate_cohort

Snapshot = dict[str, tuple[int, int, int]]
HASHED = r"archive-[0-9a-f]{12}"
FOREIGN = r"exists and was not made by lungct for .*: it is left untouched"
#: What a prepare run may create beside --output: the dataset and its staging folders.
OUTPUT = ("out", "out.partial", "out.old")
#: Lock files lungct may create (beside --output, in the work dir): allowed when created.
LOCK_FILE = re.compile(r"[^/]*\.lock")


# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> Snapshot:
    """Every path under ``root`` (links not followed) -> (inode, size, mtime_ns)."""
    found: Snapshot = {}
    for folder, subfolders, names in os.walk(root):
        for name in subfolders + names:
            path = os.path.join(folder, name)
            status = os.lstat(path)
            found[os.path.relpath(path, root)] = (status.st_ino, status.st_size,
                                                  status.st_mtime_ns)
    return found


def assert_untouched(before: Snapshot, after: Snapshot, *allowed: str) -> None:
    """Nothing outside ``allowed`` (relative paths, each covering what lies below it) was
    created, deleted or modified; folders above an allowed path may be created, or get new
    entries, but are never replaced. New ``*.lock`` files (lungct's run locks) and the header
    index in the work folder (prepare's private cache) are allowed."""

    def inside(rel: str) -> bool:
        return any(rel == path or rel.startswith(path + "/") for path in allowed)

    def above(rel: str) -> bool:
        return any(path.startswith(rel + "/") for path in allowed)

    locks = [rel for rel in set(after) - set(before)
             if LOCK_FILE.fullmatch(rel.split("/")[-1]) or rel.split("/")[-1] == INDEX_NAME]
    allowed = (*allowed, *locks)
    for rel in sorted(set(before) | set(after)):
        if inside(rel):
            continue
        if above(rel):
            assert rel in after, f"{rel} was deleted"
            assert rel not in before or before[rel][0] == after[rel][0], f"{rel} was replaced"
            continue
        assert rel in before, f"{rel} was created"
        assert rel in after, f"{rel} was deleted"
        assert before[rel] == after[rel], f"{rel} was modified"


def extraction_paths(folder: Path, root: Path) -> tuple[str, str, str]:
    """The folder, its .partial folder and its record, relative to ``root``."""
    rel = folder.relative_to(root).as_posix()
    parent, name = rel.rsplit("/", 1)
    return rel, f"{parent}/.{name}.partial", f"{rel}.lungct.json"


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return path


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def touch_later(path: Path) -> None:
    """Give ``path`` a new modification time: its extraction is then outdated."""
    status = path.stat()
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def work_with_neighbours(tmp_path: Path) -> Path:
    """A working folder holding an unrelated file and another archive's extraction."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("not lungct's")
    extract_archive(make_zip(tmp_path / "other" / "other.zip", {"o.txt": b"other"}),
                    work / "extracted")
    return work


@pytest.fixture
def class_tree(ct_slice: Callable[..., Path], tmp_path: Path) -> Callable[[str], Path]:
    """Factory: a class-folder dataset of CT slices (4 patients x 2 classes x 2) under tmp_path."""

    def make(name: str) -> Path:
        rng = np.random.default_rng(0)
        for patient in range(4):
            for label in ("cancer", "benign"):
                for index in range(2):
                    ct_slice(f"{name}/{label}/LIDC-IDRI-{patient:04d}/{index}.dcm",
                             rng.uniform(-1000, 200, (16, 16)), float(index),
                             patient_id=f"LIDC-IDRI-{patient:04d}",
                             series_uid=f"1.2.826.0.1.{patient}.{int(label == 'cancer')}")
        return tmp_path / name

    return make


def tree_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def prepare(tmp_path: Path, *args: str) -> int:
    return main(["--work-dir", str(tmp_path / "work"), "--output", str(tmp_path / "out"),
                 "--workers", "1", "-q", "--image-size", "16", "--target-count", "16", *args])


def csv_column(path: Path, column: str) -> set[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row[column] for row in csv.DictReader(handle)}


def one_sentence(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------- archive names


@pytest.mark.parametrize("name", ["..zip", ".zip", "...zip", "...tar.gz", ".tar.gz", "..tar"])
def test_dot_archive_names_stay_in_their_own_folder(tmp_path: Path, name: str) -> None:
    """An archive named only dots extracts into extracted/archive-<hash>/; re-extracting it
    (outdated) removes only that folder, never the working folder or other extractions."""
    work = work_with_neighbours(tmp_path)
    files = {"a/1.txt": b"one"}
    archive = (make_tar if ".tar" in name else make_zip)(work / name, files)
    before = snapshot(tmp_path)
    folder = extract_archive(archive, work / "extracted")
    assert folder.parent == work / "extracted" and re.fullmatch(HASHED, folder.name)
    touch_later(archive)
    assert extract_archive(archive, work / "extracted") == folder  # outdated: redone
    assert extract_archive(archive, work / "extracted") == folder  # reused
    assert files_under(folder) == files
    allowed = extraction_paths(folder, tmp_path)
    assert_untouched(before, snapshot(tmp_path), *allowed, f"work/{name}")
    assert (work / "precious.txt").read_text() == "not lungct's"
    assert files_under(work / "extracted" / "other") == {"o.txt": b"other"}


def test_dots_zip_through_the_cli_twice(tmp_path: Path, class_tree, capsys) -> None:
    """The reported bug: `--input ...zip` run twice wiped the working folder."""
    tree = class_tree("data")
    work = work_with_neighbours(tmp_path)
    archive = make_zip(work / "...zip", tree_files(tree))
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(archive)) == 0
    touch_later(archive)
    assert prepare(tmp_path, "--input", str(archive), "--overwrite") == 0
    [folder] = [p for p in (work / "extracted").iterdir() if re.fullmatch(HASHED, p.name)]
    allowed = extraction_paths(folder, tmp_path)
    assert_untouched(before, snapshot(tmp_path), *allowed, "work/...zip", *OUTPUT)
    assert csv_column(tmp_path / "out" / "manifest.csv", "source_file")


@pytest.mark.parametrize(
    "name",
    ["a\\..\\b.zip", "x.lungct.json.zip", ".hidden.zip", "tab\there.zip", "q?.zip",
     "x" * 200 + ".zip", os.fsdecode(b"bad\xff.zip"), "stale.partial.zip"],
)
def test_unusable_stems_get_a_hashed_name(tmp_path: Path, name: str) -> None:
    """Stems with separators, control characters, undecodable bytes, lungct's own suffixes,
    a leading dot or too many bytes never become a folder name."""
    archive = make_zip(tmp_path / name, {"a.txt": b"a"})
    folder = extract_archive(archive, tmp_path / "extracted")
    assert folder.parent == tmp_path / "extracted" and re.fullmatch(HASHED, folder.name)
    assert sorted(os.listdir(tmp_path / "extracted")) == [folder.name,
                                                          folder.name + ".lungct.json"]


def test_parent_components_in_the_archive_path(tmp_path: Path) -> None:
    """`a/../b.zip` (a symlinked `a` included) names the archive b.zip where the system
    resolves it; each distinct archive gets its own folder, nothing lands elsewhere."""
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere" / "deep")
    make_zip(tmp_path / "in" / "b.zip", {"in.txt": b"in"})
    make_zip(tmp_path / "elsewhere" / "b.zip", {"elsewhere.txt": b"elsewhere"})
    before = snapshot(tmp_path)
    work = tmp_path / "work"
    plain = resolve_source("local", input_path=tmp_path / "in" / "a" / ".." / "b.zip",
                           kaggle_dataset="o/d", work_dir=work, max_patients=None,
                           synthetic_patients=0, synthetic_size_px=0, seed=0).root
    linked = extract_archive(tmp_path / "in" / "link" / ".." / "b.zip", work / "extracted")
    assert plain == work / "extracted" / "b" and files_under(plain) == {"in.txt": b"in"}
    assert re.fullmatch(r"b-[0-9a-f]{12}", linked.name)
    assert files_under(linked) == {"elsewhere.txt": b"elsewhere"}
    assert_untouched(before, snapshot(tmp_path), "work")


def test_same_archive_name_in_two_folders(tmp_path: Path) -> None:
    """x/cohort.zip and y/cohort.zip each keep their own extraction, run after run."""
    first = make_zip(tmp_path / "x" / "cohort.zip", {"x.txt": b"x"})
    second = make_zip(tmp_path / "y" / "cohort.zip", {"y.txt": b"y"})
    root = tmp_path / "work" / "extracted"
    a = extract_archive(first, root)
    b = extract_archive(second, root)
    assert a == root / "cohort" and re.fullmatch(r"cohort-[0-9a-f]{12}", b.name)
    for archive, folder, other in ((first, a, b), (second, b, a), (first, a, b)):
        touch_later(archive)
        before = snapshot(tmp_path)
        assert extract_archive(archive, root) == folder
        assert_untouched(before, snapshot(tmp_path), *extraction_paths(folder, tmp_path))
        assert files_under(other) == ({"x.txt": b"x"} if other == a else {"y.txt": b"y"})
    assert extraction_folder(second, root) == b


# --------------------------------------------------------------------------- foreign folders


@pytest.mark.parametrize("occupant", ["folder", "partial", "record", "file", "link"])
def test_foreign_extraction_folder_is_left_untouched(tmp_path: Path, occupant: str) -> None:
    """Anything already at the folder's name (or its .partial or record name) that lungct did
    not make for this archive is refused with one sentence and left exactly as it was."""
    archive = make_zip(tmp_path / "cohort.zip", {"a.txt": b"a"})
    root = tmp_path / "work" / "extracted"
    root.mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    if occupant == "folder":
        (root / "cohort").mkdir()
        (root / "cohort" / "mine.dcm").write_text("user data")
    elif occupant == "partial":
        (root / ".cohort.partial").mkdir()
    elif occupant == "record":
        (root / "cohort.lungct.json").write_text('{"slug": "someone/else"}')
    elif occupant == "file":
        (root / "cohort").write_text("a file")
    else:
        (root / "cohort").symlink_to(tmp_path / "outside")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=FOREIGN):
        extract_archive(archive, root)
    assert_untouched(before, snapshot(tmp_path))


def test_link_in_place_of_own_extraction_is_refused(tmp_path: Path) -> None:
    """lungct's own folder swapped for a link to elsewhere: a changed archive is not
    re-extracted through the link; the link and its target stay as they are."""
    archive = make_zip(tmp_path / "cohort.zip", {"a.txt": b"a"})
    root = tmp_path / "extracted"
    folder = extract_archive(archive, root)
    shutil.rmtree(folder)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "keep.txt").write_text("keep")
    folder.symlink_to(tmp_path / "outside")
    touch_later(archive)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"is a link or a file, which lungct never makes"):
        extract_archive(archive, root)
    assert_untouched(before, snapshot(tmp_path))


def test_archive_inside_its_extraction_folder(tmp_path: Path) -> None:
    """An archive stored inside the folder its extraction would replace is never deleted."""
    root = tmp_path / "work" / "extracted"
    inside = make_zip(root / "cohort" / "cohort.zip", {"a.txt": b"a"})
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=FOREIGN):
        extract_archive(inside, root)
    status = inside.stat()
    identity = {"name": inside.name, "size_bytes": status.st_size + 1,
                "mtime_ns": status.st_mtime_ns, "path": str(inside.resolve())}
    marker_path(root / "cohort").write_text(json.dumps({"archive": identity}))
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"lies inside .*cohort, the folder its extraction "
                                        r"replaces: move the archive elsewhere"):
        extract_archive(inside, root)
    assert_untouched(before, snapshot(tmp_path))


def test_archive_inside_the_input_folder_is_only_read(tmp_path: Path, class_tree) -> None:
    """--input DIR holding an archive: the archive is listed as skipped, never extracted."""
    tree = class_tree("data")
    make_zip(tree / "cancer" / "bundle.zip", {"x.dcm": b"x"})
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(tree)) == 0
    assert_untouched(before, snapshot(tmp_path), *OUTPUT)
    assert "cancer/bundle.zip" in csv_column(tmp_path / "out" / "skipped.csv", "file")


# --------------------------------------------------------------------------- work dir


def test_symlinked_work_dir(tmp_path: Path, class_tree) -> None:
    """A work dir that is a link: extraction lands in its target's extracted/, and a re-run
    with a changed archive replaces only that extraction."""
    archive = make_zip(tmp_path / "cohort.zip", tree_files(class_tree("data")))
    (tmp_path / "real_work").mkdir()
    (tmp_path / "real_work" / "precious.txt").write_text("keep")
    (tmp_path / "work").symlink_to(tmp_path / "real_work")
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(archive)) == 0
    touch_later(archive)
    assert prepare(tmp_path, "--input", str(archive), "--overwrite") == 0
    assert (tmp_path / "work").is_symlink()
    allowed = extraction_paths(tmp_path / "real_work" / "extracted" / "cohort", tmp_path)
    assert_untouched(before, snapshot(tmp_path), *allowed, "cohort.zip", *OUTPUT)


def test_read_only_work_dir_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, class_tree
) -> None:
    """A work dir where nothing can be created: exit 2, one sentence, nothing changed."""
    archive = make_zip(tmp_path / "cohort.zip", tree_files(class_tree("data")))
    work = tmp_path / "work"
    work.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def read_only_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self.is_relative_to(work):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(archive)) == 2
    err = one_sentence(capsys)
    assert re.search(r"/work\b.*Permission denied", err), err
    assert_untouched(before, snapshot(tmp_path))
    with pytest.raises(UserError, match=r"cannot write in .*work/extracted \(Permission "
                                        r"denied\): choose a writable --work-dir"):
        extract_archive(archive, work / "extracted")
    assert_untouched(before, snapshot(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_work_dir_for_real(tmp_path: Path, capsys, class_tree) -> None:
    """The same with real permissions (skipped when running as root)."""
    archive = make_zip(tmp_path / "cohort.zip", tree_files(class_tree("data")))
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        assert prepare(tmp_path, "--input", str(archive)) == 2
        assert "Permission denied" in one_sentence(capsys)
        assert_untouched(before, snapshot(tmp_path))
    finally:
        work.chmod(0o755)


def test_read_only_extracted_folder_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extracted/ exists but its record cannot be written: one sentence, nothing removed."""
    from lungct.prepare import archives

    archive = make_zip(tmp_path / "cohort.zip", {"a.txt": b"a"})
    folder = extract_archive(archive, tmp_path / "extracted")
    touch_later(archive)

    def refuse(*args: object) -> None:
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(archives, "atomic_write_json", refuse)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"cannot write in .*extracted \(Read-only file system\)"):
        extract_archive(archive, tmp_path / "extracted")
    assert_untouched(before, snapshot(tmp_path))
    assert files_under(folder) == {"a.txt": b"a"}


# --------------------------------------------------------------------------- hostile entries


def test_absolute_tar_entry_is_refused_and_listed(tmp_path: Path, class_tree) -> None:
    """A tar with an absolute-path entry: refused, listed in skipped.csv, no crash."""
    files = {**tree_files(class_tree("data")), "/abs/path.txt": b"absolute",
             "../up.txt": b"up", "//double.txt": b"double"}
    archive = make_tar(tmp_path / "cohort.tar", files)
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(archive)) == 0
    listed = csv_column(tmp_path / "out" / "skipped.csv", "file")
    assert {"\\x2fabs/path.txt", "../up.txt", "\\x2f\\x2fdouble.txt"} <= listed
    assert not (tmp_path / "abs").exists() and not Path("/abs/path.txt").exists()
    allowed = extraction_paths(tmp_path / "work" / "extracted" / "cohort", tmp_path)
    assert_untouched(before, snapshot(tmp_path), *allowed, *OUTPUT)


# --------------------------------------------------------------------------- undecodable names


def rename_bytes(path: Path, new_name: bytes) -> bytes:
    """Rename ``path`` to ``new_name`` (raw bytes) in its folder; return the new path."""
    target = os.path.join(os.fsencode(path.parent), new_name)
    os.rename(os.fsencode(path), target)
    return target


def test_undecodable_name_in_class_folders(tmp_path: Path, class_tree, ct_slice) -> None:
    """b"bad\\xff.dcm" in a class folder is read and listed as bad\\xff.dcm (the stated
    escape); an unusable b"notes\\xfe.txt" is skipped under its escaped name."""
    tree = class_tree("data")
    slice_path = ct_slice("data/cancer/LIDC-IDRI-0000/tmp.dcm", np.zeros((16, 16)), 5.0,
                          patient_id="LIDC-IDRI-0000", series_uid="1.2.826.0.1.0.1")
    rename_bytes(slice_path, b"bad\xff.dcm")
    (tree / os.fsdecode(b"notes\xfe.txt")).write_text("not an image")
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(tree), "--target-count", "40",
                   "--max-per-patient", "40") == 0
    used = csv_column(tmp_path / "out" / "manifest.csv", "source_file")
    skipped = csv_column(tmp_path / "out" / "skipped.csv", "file")
    assert "cancer/LIDC-IDRI-0000/bad\\xff.dcm" in used | skipped
    assert "notes\\xfe.txt" in skipped
    assert_untouched(before, snapshot(tmp_path), *OUTPUT)


def test_undecodable_name_in_an_lidc_tree(tmp_path: Path) -> None:
    """A CT slice renamed b"bad\\xff.dcm" inside an LIDC-style tree (DICOM + XML readings)."""
    tree = tmp_path / "lidc"
    generate_cohort(tree, n_patients=4, image_size_px=64, seed=3)
    victim = sorted(tree.rglob("*.dcm"))[len(list(tree.rglob("*.dcm"))) // 2]
    relative_folder = victim.parent.relative_to(tree).as_posix()
    rename_bytes(victim, b"bad\xff.dcm")
    (tree / os.fsdecode(b"notes\xfe.txt")).write_text("not DICOM")
    before = snapshot(tmp_path)
    assert prepare(tmp_path, "--input", str(tree), "--image-size", "32", "--view", "patch",
                   "--target-count", "40") == 0
    used = csv_column(tmp_path / "out" / "manifest.csv", "source_file")
    skipped = csv_column(tmp_path / "out" / "skipped.csv", "file")
    assert f"{relative_folder}/bad\\xff.dcm" in used | skipped
    assert "notes\\xfe.txt" in skipped
    assert_untouched(before, snapshot(tmp_path), *OUTPUT)
    dataset = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["files_skipped"]["total"] == len(skipped)

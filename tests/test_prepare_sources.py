"""Tests for lungct.prepare.sources: local folders and archives, Kaggle (faked), synthetic, auto."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import sys
import tarfile
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from lungct.errors import UserError
from lungct.prepare import archives
from lungct.prepare import kaggle as kaggle_source
from lungct.prepare.archives import extract_archive, read_refused_entries
from lungct.prepare.kaggle import download_kaggle, kaggle_credentials_present, select_patient_files
from lungct.prepare.sources import ResolvedSource, listed_entry_name, resolve_source

SLUG = "someone/lidc-mini"
NESTED = {
    "LIDC-IDRI-0001/study/series/1-001.dcm": b"slice one",
    "LIDC-IDRI-0001/study/series/069.xml": b"<LidcReadMessage/>",
    "top.txt": b"top level",
}


# --------------------------------------------------------------------------- helpers


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for name, data in files.items():
            bundle.writestr(name, data)
    return path


def add_tar_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_tar_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def make_tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add_tar_file(tar, name, data)
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def all_paths(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def resolve(source: str, work_dir: Path, **overrides: object) -> ResolvedSource:
    arguments: dict[str, object] = {
        "input_path": None,
        "kaggle_dataset": SLUG,
        "work_dir": work_dir,
        "max_patients": None,
        "synthetic_patients": 3,
        "synthetic_size_px": 64,
        "seed": 7,
    }
    arguments.update(overrides)
    return resolve_source(source, **arguments)  # type: ignore[arg-type]


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home folder and no KAGGLE_* variables."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def with_credentials(no_credentials: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Legacy API key credentials in the environment."""
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef")
    return no_credentials


class FakeKaggleApi:
    """The part of kaggle 2.x's KaggleApi that lungct.prepare.kaggle uses, in memory."""

    def __init__(self, files: dict[str, bytes], error: BaseException | None = None) -> None:
        self.files = files
        self.error = error
        self.calls: list[str] = []

    def _record(self, call: str) -> None:
        self.calls.append(call)
        print(f"Dataset URL: https://www.kaggle.com/datasets/{SLUG}")  # the real one prints
        if self.error is not None:
            raise self.error

    def authenticate(self) -> None:
        self._record("authenticate")

    def dataset_list_files(self, dataset: str, page_token: str | None = None, page_size: int = 20):
        self._record(f"list {page_token or ''}")
        names = sorted(self.files)
        start = int(page_token or 0)
        page = names[start : start + page_size]
        next_token = str(start + page_size) if start + page_size < len(names) else ""
        return SimpleNamespace(
            files=[SimpleNamespace(name=name, total_bytes=len(self.files[name])) for name in page],
            next_page_token=next_token,
            error_message="",
        )

    def dataset_download_file(
        self, dataset: str, file_name: str, path: str, force: bool, quiet: bool, unzip: bool
    ) -> bool:
        self._record(f"file {file_name}")
        target = Path(path) / file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.files[file_name])
        return True

    def dataset_download_files(
        self, dataset: str, path: str, force: bool, quiet: bool, unzip: bool
    ) -> None:
        self._record("all")
        Path(path).mkdir(parents=True, exist_ok=True)
        make_zip(Path(path) / f"{dataset.split('/')[1]}.zip", self.files)


@pytest.fixture
def install_kaggle(monkeypatch: pytest.MonkeyPatch):
    """Put a fake ``kaggle`` module holding ``api`` into sys.modules."""

    def install(api: FakeKaggleApi) -> FakeKaggleApi:
        monkeypatch.setitem(sys.modules, "kaggle", types.SimpleNamespace(api=api))
        return api

    return install


def kaggle_files() -> dict[str, bytes]:
    return {
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0003/a/1-001.dcm": b"p3",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-001.dcm": b"p1 slice 1",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-002.dcm": b"p1 slice 2",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0002/a/1-001.dcm": b"p2",
        "LIDC-XML-only/tcia-lidc-xml/157/158.xml": b"<LidcReadMessage/>",
        "LIDC-IDRI-0001-0003.zip": b"batch archive naming no single patient",
        "unattributed/000001.dcm": b"slice of unknown patient",
    }


# --------------------------------------------------------------------------- archives


def test_zip_extracts_with_nesting(tmp_path: Path) -> None:
    """A normal zip lands in extracted/<name>/ with its folders kept."""
    folder = extract_archive(make_zip(tmp_path / "cohort.zip", NESTED), tmp_path / "extracted")
    assert folder == tmp_path / "extracted" / "cohort"
    assert files_under(folder) == NESTED
    assert read_refused_entries(folder) == []


def test_tar_gz_extracts_with_nesting(tmp_path: Path) -> None:
    """A .tar.gz archive extracts the same way, its full suffix stripped from the folder name."""
    archive = make_tar_gz(tmp_path / "cohort.tar.gz", NESTED)
    folder = extract_archive(archive, tmp_path / "extracted")
    assert folder.name == "cohort"
    assert files_under(folder) == NESTED


def test_rerun_reuses_extraction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A second call with the same archive rewrites nothing."""
    archive = make_zip(tmp_path / "cohort.zip", NESTED)
    folder = extract_archive(archive, tmp_path / "extracted")
    written = folder / "top.txt"
    before = (written.stat().st_ino, written.stat().st_mtime_ns)
    with caplog.at_level(logging.INFO, logger="lungct.prepare.archives"):
        assert extract_archive(archive, tmp_path / "extracted") == folder
    assert (written.stat().st_ino, written.stat().st_mtime_ns) == before
    assert "reusing" in caplog.text


def test_changed_archive_is_extracted_again(tmp_path: Path) -> None:
    """An archive replaced by one of different content is extracted afresh."""
    archive = make_zip(tmp_path / "cohort.zip", NESTED)
    extract_archive(archive, tmp_path / "extracted")
    make_zip(archive, {"other.txt": b"new content, longer than before"})
    folder = extract_archive(archive, tmp_path / "extracted")
    assert files_under(folder) == {"other.txt": b"new content, longer than before"}


def test_interrupted_extraction_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed before the rename leaves its .partial folder and its "in progress"
    record; the next run removes both (lungct made them) and extracts afresh."""
    archive = make_zip(tmp_path / "cohort.zip", NESTED)

    class KilledBeforeRename:  # archives' view of os: the process dies at the rename
        def __getattr__(self, name: str) -> object:
            return getattr(os, name)

        def replace(self, *args: object) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(archives, "os", KilledBeforeRename())
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, tmp_path / "extracted")
    monkeypatch.undo()
    partial = tmp_path / "extracted" / ".cohort.partial"
    record = json.loads((tmp_path / "extracted" / "cohort.lungct.json").read_text())
    assert partial.is_dir() and set(record) == {"in_progress"}
    assert record["in_progress"]["path"] == str(archive.resolve())
    (partial / "half_written.dcm").write_bytes(b"trunc")
    folder = extract_archive(archive, tmp_path / "extracted")
    assert files_under(folder) == NESTED
    assert not partial.exists()
    assert set(json.loads((tmp_path / "extracted" / "cohort.lungct.json").read_text())) == {
        "archive", "refused_entries"}


def test_hostile_tar_entries_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Traversal, absolute paths, links out and special files are refused, safe entries kept."""
    archive = tmp_path / "inputs" / "hostile.tar"
    archive.parent.mkdir()
    with tarfile.open(archive, "w") as tar:
        add_tar_file(tar, "safe/a.dcm", b"kept")
        add_tar_file(tar, "../evil.txt", b"escape")
        add_tar_file(tar, "/abs/path.txt", b"absolute")
        add_tar_special(tar, "safe/link_out", tarfile.SYMTYPE, "../../outside.txt")
        add_tar_special(tar, "safe/link_abs", tarfile.SYMTYPE, "/etc/passwd")
        add_tar_special(tar, "hard_out", tarfile.LNKTYPE, "../outside.txt")
        add_tar_special(tar, "device", tarfile.CHRTYPE)
        add_tar_special(tar, "pipe", tarfile.FIFOTYPE)
    before = all_paths(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lungct.prepare.archives"):
        folder = extract_archive(archive, tmp_path / "extracted")
    refused = dict(read_refused_entries(folder))
    assert set(refused) == {
        "../evil.txt", "/abs/path.txt", "safe/link_out", "safe/link_abs", "hard_out", "device",
        "pipe",
    }  # fmt: skip
    assert refused["../evil.txt"] == "'..' path component"
    assert refused["/abs/path.txt"] == "absolute path"
    assert "outside the archive folder" in refused["safe/link_out"]
    assert "outside the archive folder" in refused["hard_out"]
    assert refused["device"] == "device file"
    assert refused["pipe"] == "FIFO (named pipe)"
    assert files_under(folder) == {"safe/a.dcm": b"kept"}
    assert all(repr(name) in caplog.text for name in refused)
    created = all_paths(tmp_path) - before
    assert all(path.split("/")[0] == "extracted" for path in created)
    assert not any(path.is_symlink() for path in folder.rglob("*"))


def test_hostile_zip_entries_are_refused(tmp_path: Path) -> None:
    """Zip entries with '..', absolute paths, drive letters or a symlink out are refused."""
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("safe/a.dcm", b"kept")
        bundle.writestr("../evil.txt", b"escape")
        bundle.writestr("/abs/path.txt", b"absolute")
        bundle.writestr("C:/windows/evil.txt", b"drive")
        bundle.writestr("safe\\..\\..\\backslash.txt", b"backslash traversal")
        link = zipfile.ZipInfo("safe/link_out")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        bundle.writestr(link, "../../outside.txt")
    before = all_paths(tmp_path)
    folder = extract_archive(archive, tmp_path / "extracted")
    refused = dict(read_refused_entries(folder))
    assert refused == {
        "../evil.txt": "'..' path component",
        "/abs/path.txt": "absolute path",
        "C:/windows/evil.txt": "drive letter in path",
        "safe\\..\\..\\backslash.txt": "'..' path component",
        "safe/link_out": "symbolic link to '../../outside.txt' outside the archive folder",
    }
    assert files_under(folder) == {"safe/a.dcm": b"kept"}
    assert all(path.split("/")[0] == "extracted" for path in all_paths(tmp_path) - before)


def test_links_inside_archive_become_copies(tmp_path: Path) -> None:
    """A symlink and a hard link to files inside the archive are written as plain copies."""
    archive = tmp_path / "links.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_tar_file(tar, "./series/1-001.dcm", b"pixels")
        add_tar_special(tar, "./series/alias.dcm", tarfile.SYMTYPE, "1-001.dcm")
        add_tar_special(tar, "./copy.dcm", tarfile.LNKTYPE, "series/1-001.dcm")
    folder = extract_archive(archive, tmp_path / "extracted")
    assert files_under(folder) == {
        "series/1-001.dcm": b"pixels", "series/alias.dcm": b"pixels", "copy.dcm": b"pixels",
    }  # fmt: skip
    assert not any(path.is_symlink() for path in folder.rglob("*"))
    assert read_refused_entries(folder) == []


def test_zip_declaring_too_much_is_refused(tmp_path: Path) -> None:
    """A zip whose declared content exceeds the limit is refused before anything is written."""
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(1000)})
    with pytest.raises(UserError, match=r"bomb\.zip declares 1,000 bytes.*possible zip bomb"):
        extract_archive(archive, tmp_path / "extracted", max_total_bytes=999)
    assert list((tmp_path / "extracted").iterdir()) == []


def test_tar_expanding_too_much_is_refused(tmp_path: Path) -> None:
    """A tar whose content grows past the limit is refused and its partial output removed."""
    archive = make_tar_gz(tmp_path / "bomb.tgz", {"a.bin": bytes(600), "b.bin": bytes(600)})
    with pytest.raises(UserError, match=r"bomb\.tgz expands to more than 1,000 bytes"):
        extract_archive(archive, tmp_path / "extracted", max_total_bytes=1000)
    assert list((tmp_path / "extracted").iterdir()) == []


@pytest.mark.parametrize("name", ["broken.zip", "broken.tar.gz"])
def test_corrupt_archive_names_the_file(tmp_path: Path, name: str) -> None:
    """A corrupt or truncated archive is a UserError naming the file."""
    good = make_tar_gz(tmp_path / "good.tar.gz", {"a.bin": os.urandom(4096)}).read_bytes()
    archive = tmp_path / name
    archive.write_bytes(b"not an archive at all" if name.endswith(".zip") else good[:-2000])
    with pytest.raises(UserError, match=rf"archive .*{name} is corrupt or unreadable"):
        extract_archive(archive, tmp_path / "extracted")
    assert not (tmp_path / "extracted" / name.split(".")[0]).exists()


def fake_free_disk(monkeypatch: pytest.MonkeyPatch, free_bytes: int) -> None:
    """Make every disk look as if ``free_bytes`` were free beyond lungct's reserve."""
    real = shutil.disk_usage

    def disk_usage(path: object) -> object:
        usage = real(path)  # type: ignore[arg-type]
        return usage._replace(free=free_bytes + archives.FREE_DISK_RESERVE_BYTES)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_zip_larger_than_the_free_disk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zip declaring more than the free space (less the reserve) is refused up front and
    leaves nothing behind; the absolute cap still applies when the disk is roomier."""
    archive = make_zip(tmp_path / "big.zip", {"zeros.bin": bytes(1000)})
    fake_free_disk(monkeypatch, 999)
    with pytest.raises(UserError, match=r"big\.zip declares 1,000 bytes of content, more than "
                                        r"the 999 bytes free on the disk of .*extracted .*"
                                        r"choose another --work-dir"):
        extract_archive(archive, tmp_path / "extracted")
    assert list((tmp_path / "extracted").iterdir()) == []
    fake_free_disk(monkeypatch, 1000)
    assert files_under(extract_archive(archive, tmp_path / "extracted")) == {
        "zeros.bin": bytes(1000)}


def test_tar_larger_than_the_free_disk_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tar whose content outgrows the free space is stopped while it is written."""
    archive = make_tar_gz(tmp_path / "big.tgz", {"a.bin": bytes(600), "b.bin": bytes(600)})
    fake_free_disk(monkeypatch, 1000)
    with pytest.raises(UserError, match=r"big\.tgz expands to more than the 1,000 bytes free"):
        extract_archive(archive, tmp_path / "extracted", max_total_bytes=5000)
    assert list((tmp_path / "extracted").iterdir()) == []


def test_zip_with_undecodable_utf8_names_is_one_sentence(tmp_path: Path) -> None:
    """A zip flagging its names UTF-8 when they are not is refused, not a crash."""
    raw = bytearray(make_zip(tmp_path / "flagged.zip", {"name_x.dcm": b"x"}).read_bytes())
    raw[:] = raw.replace(b"name_x", b"name\xffx")  # in the local and the central header
    raw[raw.find(b"PK\x03\x04") + 7] |= 0x08  # general purpose flag bit 11: names are UTF-8
    raw[raw.find(b"PK\x01\x02") + 9] |= 0x08
    archive = tmp_path / "flagged.zip"
    archive.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"flagged\.zip is corrupt or unreadable"):
        extract_archive(archive, tmp_path / "extracted")


def test_entry_name_the_file_system_refuses(tmp_path: Path) -> None:
    """An entry whose name is too long for the file system is refused and recorded."""
    long_name = "d/" + "x" * 300 + ".dcm"
    folder = extract_archive(make_tar_gz(tmp_path / "long.tgz", {long_name: b"x", "ok": b"y"}),
                             tmp_path / "extracted")
    assert files_under(folder) == {"ok": b"y"}
    [(name, reason)] = read_refused_entries(folder)
    assert name == long_name and reason.startswith("name the file system refuses")


def test_refused_names_are_listed_relative_and_escaped(tmp_path: Path) -> None:
    """Absolute, '..' and undecodable entry names are listed so that they stay relative to
    the extracted folder and are valid UTF-8."""
    archive = tmp_path / "names.tar"
    with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tar:
        add_tar_file(tar, "/abs/path.txt", b"a")
        add_tar_file(tar, os.fsdecode(b"../bad\xff.txt"), b"b")
        add_tar_file(tar, os.fsdecode(b"ok/bad\xfe.dcm"), b"kept")
    result = resolve("local", tmp_path / "work", input_path=archive)
    assert dict(result.refused_entries) == {
        "\\x2fabs/path.txt": "absolute path", "../bad\\xff.txt": "'..' path component"}
    for name, _ in result.refused_entries:
        assert not Path(name).is_absolute() and name.encode("utf-8")
        assert (result.root / name).relative_to(result.root).as_posix() == name
    assert files_under(result.root) == {os.fsdecode(b"ok/bad\xfe.dcm"): b"kept"}


def test_listed_entry_name() -> None:
    """The stated escapes of skipped.csv for archive entries."""
    assert listed_entry_name("/etc/passwd") == "\\x2fetc/passwd"
    assert listed_entry_name("x.zip!//abs") == "x.zip!/\\x2fabs"
    assert listed_entry_name("../evil.txt") == "../evil.txt"
    assert listed_entry_name("a\x00b") == "a\\x00b"
    assert listed_entry_name(os.fsdecode(b"\xff/x")) == "\\xff/x"


# --------------------------------------------------------------------------- local source


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    """--input DIR is scanned in place and recorded as local:<path as given>."""
    (tmp_path / "dicoms").mkdir()
    result = resolve("local", tmp_path / "work", input_path=tmp_path / "dicoms")
    assert result == ResolvedSource("local", tmp_path / "dicoms", f"local:{tmp_path / 'dicoms'}")


def test_local_archive_is_extracted_with_refusals(tmp_path: Path) -> None:
    """--input ARCHIVE extracts into work_dir/extracted/ and carries the refused entries."""
    archive = make_zip(tmp_path / "cohort.zip", {"a/1.dcm": b"x", "../evil": b"y"})
    result = resolve("auto", tmp_path / "work", input_path=archive)
    assert result.kind == "local"
    assert result.root == tmp_path / "work" / "extracted" / "cohort"
    assert result.description == f"local:{archive}"
    assert result.refused_entries == (("../evil", "'..' path component"),)


def test_missing_input_path(tmp_path: Path) -> None:
    """A missing --input is a UserError naming it."""
    with pytest.raises(UserError, match=r"input path .*nowhere does not exist"):
        resolve("local", tmp_path, input_path=tmp_path / "nowhere")


def test_input_of_unknown_type(tmp_path: Path) -> None:
    """A file that is not an archive is refused with the accepted suffixes."""
    (tmp_path / "scan.rar").write_bytes(b"rar")
    with pytest.raises(UserError, match=r"neither a folder nor an archive \(\.tar\.gz"):
        resolve("local", tmp_path, input_path=tmp_path / "scan.rar")


def test_local_source_needs_input(tmp_path: Path) -> None:
    """--source local without --input is a UserError."""
    with pytest.raises(UserError, match=r"--source local needs --input"):
        resolve("local", tmp_path)


def test_input_with_other_source_is_refused(tmp_path: Path) -> None:
    """--input together with --source synthetic is contradictory."""
    with pytest.raises(UserError, match=r"--input cannot be combined with --source synthetic"):
        resolve("synthetic", tmp_path, input_path=tmp_path)


def test_unknown_source_is_a_value_error(tmp_path: Path) -> None:
    """A source outside SOURCES is a programming error naming the value."""
    with pytest.raises(ValueError, match=r"got 'ftp'"):
        resolve("ftp", tmp_path)


# --------------------------------------------------------------------------- credentials


def write_json(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "environ", "expected"),
    [
        ({}, {}, False),
        ({".kaggle/kaggle.json": '{"username": "u", "key": "k"}'}, {}, True),
        ({".kaggle/kaggle.json": '{"username": "u"}'}, {}, False),
        ({".kaggle/kaggle.json": "not json"}, {}, False),
        ({".kaggle/kaggle.json": '{"username": "u"}'}, {"KAGGLE_KEY": "k"}, True),
        ({"cfg/kaggle.json": '{"username": "u", "key": "k"}'}, {"KAGGLE_CONFIG_DIR": "cfg"}, True),
        ({".config/kaggle/kaggle.json": '{"username": "u", "key": "k"}'}, {}, True),
        ({}, {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"}, True),
        ({}, {"KAGGLE_USERNAME": "u"}, False),
        ({}, {"KAGGLE_API_TOKEN": "KGAT_0123"}, True),
        ({".kaggle/access_token": "KGAT_0123\n"}, {}, True),
        ({".kaggle/access_token.txt": "KGAT_0123"}, {}, True),
        ({".kaggle/access_token": "  \n"}, {}, False),
        ({".kaggle/credentials.json": '{"refresh_token": "r"}'}, {}, True),
        ({".kaggle/credentials.json": '{"username": "u"}'}, {}, False),
    ],
)
def test_kaggle_credentials_present(
    tmp_path: Path, files: dict[str, str], environ: dict[str, str], expected: bool
) -> None:
    """Each credential form the kaggle package reads is recognised; incomplete ones are not."""
    for name, text in files.items():
        write_json(tmp_path / name, text)
    if "KAGGLE_CONFIG_DIR" in environ:
        environ = {**environ, "KAGGLE_CONFIG_DIR": str(tmp_path / environ["KAGGLE_CONFIG_DIR"])}
    assert kaggle_credentials_present(environ, home=tmp_path) is expected


def test_credentials_default_to_process_environment(with_credentials: Path) -> None:
    """Without arguments the process environment and $HOME are read."""
    assert kaggle_credentials_present() is True


# --------------------------------------------------------------------------- Kaggle


def test_select_patient_files() -> None:
    """The first patients by id are picked; batch folders and stray images name no patient."""
    selected, n_patients = select_patient_files(kaggle_files(), max_patients=2)
    assert n_patients == 3
    assert selected == [
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-001.dcm",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-002.dcm",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0002/a/1-001.dcm",
        "LIDC-XML-only/tcia-lidc-xml/157/158.xml",
    ]


def test_max_patients_downloads_selected_files_one_by_one(
    tmp_path: Path, install_kaggle, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """With --max-patients the file list (all pages) is read and only those files fetched."""
    monkeypatch.setattr(kaggle_source, "_KAGGLE_PAGE_SIZE", 2)
    api = install_kaggle(FakeKaggleApi(kaggle_files()))
    root = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=1)
    assert root == tmp_path / "raw" / "first-1-patients"
    assert files_under(root) == {
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-001.dcm": b"p1 slice 1",
        "LIDC-IDRI-0001-0003/LIDC-IDRI-0001/a/1-002.dcm": b"p1 slice 2",
        "LIDC-XML-only/tcia-lidc-xml/157/158.xml": b"<LidcReadMessage/>",
    }
    assert [call for call in api.calls if call.startswith("list")] == [
        "list ", "list 2", "list 4", "list 6",
    ]  # fmt: skip
    assert "all" not in api.calls
    assert capsys.readouterr().out == ""


def test_completed_download_is_reused_offline(tmp_path: Path, install_kaggle) -> None:
    """A re-run with a completed download does not touch the kaggle package at all."""
    install_kaggle(FakeKaggleApi(kaggle_files()))
    first = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=2)
    offline = install_kaggle(FakeKaggleApi({}, error=requests.ConnectionError("offline")))
    assert download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", 2) == first
    assert offline.calls == []


def test_archives_in_a_limited_download_are_extracted_safely(
    tmp_path: Path, install_kaggle
) -> None:
    """A per-patient archive is extracted beside itself; its refused entries are recorded."""
    bundle = make_zip(tmp_path / "p1.zip", {"s/1-001.dcm": b"p1", "../evil": b"x"}).read_bytes()
    files = {"LIDC-IDRI-0001/LIDC-IDRI-0001.zip": bundle, "LIDC-IDRI-0002/1-001.dcm": b"p2"}
    install_kaggle(FakeKaggleApi(files))
    root = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=1)
    assert (root / "LIDC-IDRI-0001" / "LIDC-IDRI-0001" / "s" / "1-001.dcm").read_bytes() == b"p1"
    assert not (root / "LIDC-IDRI-0002").exists()
    assert read_refused_entries(root) == [
        ("LIDC-IDRI-0001/LIDC-IDRI-0001.zip!/../evil", "'..' path component")
    ]


def test_unsafe_kaggle_file_names_are_not_downloaded(caplog: pytest.LogCaptureFixture) -> None:
    """Listed names that could land outside the download folder are dropped with a warning."""
    names = ["LIDC-IDRI-0001/a.dcm", "../LIDC-IDRI-0001/b.dcm", "/LIDC-IDRI-0001/c.dcm",
             "x\\..\\..\\d.xml", "C:/LIDC-IDRI-0002/e.dcm", "notes.txt"]
    with caplog.at_level(logging.WARNING, logger="lungct.prepare.kaggle"):
        selected, n_patients = select_patient_files(names, max_patients=5)
    assert selected == ["LIDC-IDRI-0001/a.dcm", "notes.txt"] and n_patients == 1
    assert caplog.text.count("is not downloaded") == 4


def test_nested_archive_next_to_a_downloaded_folder_of_its_name(
    tmp_path: Path, install_kaggle
) -> None:
    """A per-patient archive whose extraction folder name is taken by downloaded files: the
    download stops with one sentence and the downloaded files are left as they are."""
    bundle = make_zip(tmp_path / "p1.zip", {"s/1-001.dcm": b"p1"}).read_bytes()
    files = {"LIDC-IDRI-0001/LIDC-IDRI-0001.zip": bundle,
             "LIDC-IDRI-0001/LIDC-IDRI-0001/1-002.dcm": b"downloaded", "LIDC-IDRI-0002/x": b""}
    install_kaggle(FakeKaggleApi(files))
    with pytest.raises(UserError, match=r"LIDC-IDRI-0001 \(or its \.partial folder .*\) exists "
                                        r"and was not made by lungct"):
        download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=1)
    folder = tmp_path / "raw" / "first-1-patients" / "LIDC-IDRI-0001" / "LIDC-IDRI-0001"
    assert files_under(folder) == {"1-002.dcm": b"downloaded"}


def test_deleted_zip_reuses_its_extraction(tmp_path: Path, install_kaggle) -> None:
    """Deleting Kaggle's zip after extraction does not trigger a new download."""
    install_kaggle(FakeKaggleApi(NESTED))
    root = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=None)
    (tmp_path / "raw" / "all" / "lidc-mini.zip").unlink()
    offline = install_kaggle(FakeKaggleApi({}, error=requests.ConnectionError("offline")))
    assert download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", None) == root
    assert offline.calls == []


def test_whole_dataset_is_downloaded_extracted_and_reused(tmp_path: Path, install_kaggle) -> None:
    """Without a limit Kaggle's zip is fetched once and extracted into extract_root."""
    api = install_kaggle(FakeKaggleApi(NESTED))
    root = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=None)
    assert root == tmp_path / "extracted" / "lidc-mini"
    assert files_under(root) == NESTED
    assert (tmp_path / "raw" / "all" / "lidc-mini.zip").is_file()
    assert download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", None) == root
    assert api.calls == ["authenticate", "all"]


def test_limit_that_cannot_apply_downloads_everything(
    tmp_path: Path, install_kaggle, caplog: pytest.LogCaptureFixture
) -> None:
    """When no file names a patient id the whole dataset is used, with a warning."""
    api = install_kaggle(FakeKaggleApi({"images/0001.dcm": b"a", "images/0002.dcm": b"b"}))
    with caplog.at_level(logging.WARNING, logger="lungct.prepare.kaggle"):
        root = download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=1)
    assert files_under(root) == {"images/0001.dcm": b"a", "images/0002.dcm": b"b"}
    assert "--max-patients 1 could not be applied" in caplog.text
    assert api.calls[-1] == "all"


def test_kaggle_source_recorded_with_slug(
    tmp_path: Path, with_credentials: Path, install_kaggle
) -> None:
    """--source kaggle downloads into work_dir/raw_kaggle/<owner>_<dataset>/."""
    install_kaggle(FakeKaggleApi(kaggle_files()))
    result = resolve("kaggle", tmp_path / "work", max_patients=1)
    assert result.kind == "kaggle"
    assert result.description == f"kaggle:{SLUG}"
    assert (
        result.root == tmp_path / "work" / "raw_kaggle" / "someone_lidc-mini" / "first-1-patients"
    )


def http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (http_error(401), r"HTTP 401: access refused.*KAGGLE_USERNAME/KAGGLE_KEY"),
        (http_error(404), r"HTTP 404: no such dataset.*check the slug given with --kaggle-dataset"),
        (requests.ConnectionError("Max retries exceeded"), r"could not be reached.*network"),
        (SystemExit(1), r"rejected the credentials"),
    ],
)
def test_kaggle_failures_are_one_sentence(
    tmp_path: Path, install_kaggle, error: BaseException, message: str
) -> None:
    """Auth, missing dataset and network failures become a UserError naming --kaggle-dataset."""
    install_kaggle(FakeKaggleApi(kaggle_files(), error=error))
    with pytest.raises(UserError, match=message) as raised:
        download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=None)
    assert "--kaggle-dataset" in str(raised.value)
    assert str(raised.value).startswith(f"Kaggle download of '{SLUG}' failed")
    assert raised.value.exit_code == 2


def test_system_exit_on_kaggle_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kaggle package that calls sys.exit while being imported becomes a UserError."""
    fake_site = tmp_path / "site"
    fake_site.mkdir()
    (fake_site / "kaggle.py").write_text(
        "print('Could not find kaggle.json')\nraise SystemExit(1)\n"
    )
    monkeypatch.delitem(sys.modules, "kaggle", raising=False)
    monkeypatch.syspath_prepend(str(fake_site))
    with pytest.raises(UserError, match=r"rejected the credentials.*--kaggle-dataset"):
        download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=None)


def test_kaggle_package_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the kaggle package the message says how to install it."""
    monkeypatch.setitem(sys.modules, "kaggle", None)
    with pytest.raises(UserError, match=r"kaggle package is not installed\): pip install kaggle"):
        download_kaggle(SLUG, tmp_path / "raw", tmp_path / "extracted", max_patients=None)


def test_missing_credentials_say_how_to_fix(tmp_path: Path, no_credentials: Path) -> None:
    """--source kaggle without credentials explains where kaggle.json or the variables go."""
    with pytest.raises(UserError, match=r"no Kaggle credentials.*--kaggle-dataset.*kaggle\.json"):
        resolve("kaggle", tmp_path)


def test_bad_slug_names_the_flag(tmp_path: Path) -> None:
    """A slug that is not owner/dataset is refused before any download."""
    with pytest.raises(UserError, match=r"--kaggle-dataset must look like owner/dataset"):
        download_kaggle("../../etc", tmp_path / "raw", tmp_path / "extracted", None)


# --------------------------------------------------------------------------- synthetic / auto


@pytest.fixture
def fake_synthetic(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Replace lungct.synthetic.cohort with a module recording generate_cohort's arguments."""
    calls: list[dict[str, object]] = []
    module = types.ModuleType("lungct.synthetic.cohort")
    module.generate_cohort = lambda **kwargs: calls.append(kwargs)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lungct.synthetic.cohort", module)
    return calls


def test_synthetic_source_calls_generate_cohort(tmp_path: Path, fake_synthetic) -> None:
    """--source synthetic writes the cohort into work_dir/raw_synthetic/."""
    result = resolve("synthetic", tmp_path)
    assert result == ResolvedSource("synthetic", tmp_path / "raw_synthetic", "synthetic")
    assert fake_synthetic == [
        {"out_dir": tmp_path / "raw_synthetic", "n_patients": 3, "image_size_px": 64, "seed": 7}
    ]


def test_auto_prefers_input_over_kaggle(
    tmp_path: Path, with_credentials: Path, fake_synthetic
) -> None:
    """auto with --input uses it even when Kaggle credentials exist."""
    result = resolve("auto", tmp_path, input_path=tmp_path)
    assert result.kind == "local"


def test_auto_uses_kaggle_when_credentials_exist(
    tmp_path: Path, with_credentials: Path, install_kaggle, fake_synthetic
) -> None:
    """auto without --input downloads from Kaggle when credentials exist."""
    install_kaggle(FakeKaggleApi(NESTED))
    result = resolve("auto", tmp_path)
    assert result.description == f"kaggle:{SLUG}"
    assert fake_synthetic == []


def test_auto_falls_back_to_synthetic_with_warning(
    tmp_path: Path, no_credentials: Path, fake_synthetic, caplog: pytest.LogCaptureFixture
) -> None:
    """auto without --input or credentials uses the synthetic cohort and says so loudly."""
    with caplog.at_level(logging.WARNING, logger="lungct.prepare.sources"):
        result = resolve("auto", tmp_path)
    assert result.kind == "synthetic"
    assert len(fake_synthetic) == 1
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "no --input and no Kaggle credentials: using the built-in SYNTHETIC cohort"
    )
    assert "results say nothing about real patients" in record.getMessage()

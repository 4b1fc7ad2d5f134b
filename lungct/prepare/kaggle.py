"""Kaggle as a data source: credential discovery, the patient-limited file selection and
the download (whole dataset or first patients) through the kaggle package, with every
failure turned into one :class:`~lungct.errors.UserError` naming ``--kaggle-dataset``.

A completed download is marked complete beside its folder (``<folder>.lungct.json``, see
:mod:`lungct.prepare.archives`) and reused without contacting Kaggle.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from lungct.errors import UserError
from lungct.fileio import atomic_write_json
from lungct.prepare.archives import (
    archive_suffix,
    describe_error,
    extract_archive,
    extraction_folder,
    marker_path,
    read_marker,
    read_refused_entries,
    unsafe_name_reason,
)

__all__ = [
    "check_slug",
    "download_kaggle",
    "kaggle_credentials_present",
    "select_patient_files",
]

LOG = logging.getLogger(__name__)

# A patient id not followed by a digit or '-', so batch folders ("LIDC-IDRI-0001-0200") name none.
_PATIENT_ID = re.compile(r"LIDC-IDRI-\d{4}(?![\d-])")
# Files that name no patient but are kept by a patient-limited download (readings, metadata).
_SHARED_FILE_SUFFIXES = (".xml", ".csv", ".json", ".txt")
_KAGGLE_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_KAGGLE_PAGE_SIZE = 200
_T = TypeVar("_T")


def kaggle_credentials_present(
    environ: Mapping[str, str] | None = None, home: Path | None = None
) -> bool:
    """Whether the installed kaggle package (2.x) would find credentials.

    It reads, in order: an access token (``KAGGLE_API_TOKEN``, holding the token or the path
    of a file with it, or ``~/.kaggle/access_token`` / ``access_token.txt``); a legacy API key
    (``username`` and ``key`` from ``kaggle.json`` in ``$KAGGLE_CONFIG_DIR``, else
    ``~/.kaggle``, else on Linux ``$XDG_CONFIG_HOME/kaggle`` or ``~/.config/kaggle``, each
    overridden by ``KAGGLE_USERNAME`` / ``KAGGLE_KEY``); an OAuth login saved by
    ``kaggle auth login`` (``~/.kaggle/credentials.json``); and a Kaggle notebook's token file.
    Presence only: whether Kaggle accepts them is known at download time.

    Args:
        environ: environment variables; ``os.environ`` when None.
        home: home folder; ``$HOME`` of ``environ`` (or the user's home) when None.
    """
    env = os.environ if environ is None else environ
    home_dir = home if home is not None else Path(env["HOME"]) if env.get("HOME") else Path.home()
    return (
        _has_access_token(env, home_dir)
        or _has_api_key(env, home_dir)
        or bool(_read_json_object(home_dir / ".kaggle" / "credentials.json").get("refresh_token"))
        or _has_notebook_token(env)
    )


def _has_access_token(env: Mapping[str, str], home_dir: Path) -> bool:
    if env.get("KAGGLE_API_TOKEN", "").strip():
        return True
    token_files = (home_dir / ".kaggle" / "access_token", home_dir / ".kaggle" / "access_token.txt")
    return any(_file_has_text(path) for path in token_files)


def _has_api_key(env: Mapping[str, str], home_dir: Path) -> bool:
    config = _read_json_object(_kaggle_config_dir(env, home_dir) / "kaggle.json")
    username = env.get("KAGGLE_USERNAME") or config.get("username")
    key = env.get("KAGGLE_KEY") or config.get("key")
    return bool(username) and bool(key)


def _has_notebook_token(env: Mapping[str, str]) -> bool:
    inside_notebook = "KAGGLE_KERNEL_RUN_TYPE" in env and "KAGGLE_DATA_PROXY_URL" in env
    return inside_notebook and _file_has_text(Path(env.get("KAGGLE_API_V1_TOKEN", "")))


def _kaggle_config_dir(env: Mapping[str, str], home_dir: Path) -> Path:
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    legacy = home_dir / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(env.get("XDG_CONFIG_HOME") or home_dir / ".config") / "kaggle"
    return legacy


def _file_has_text(path: Path) -> bool:
    try:
        return path.is_file() and bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_slug(slug: str) -> None:
    """Refuse a ``--kaggle-dataset`` that is not ``owner/dataset``; so ``owner_dataset`` is
    always one safe folder name (no separator, never ``.`` or ``..``)."""
    if not _KAGGLE_SLUG.fullmatch(slug):
        raise UserError(
            f"--kaggle-dataset must look like owner/dataset (as in the dataset's URL), got {slug!r}"
        )


def select_patient_files(names: Iterable[str], max_patients: int) -> tuple[list[str], int]:
    """Pick the files of the first ``max_patients`` patients of a dataset's file list.

    A file belongs to the last ``LIDC-IDRI-NNNN`` id in its path (batch folders such as
    ``LIDC-IDRI-0001-0200`` name none); patients are taken in id order. Files naming no
    patient are kept when they are readings or metadata (``.xml``, ``.csv``, ``.json``,
    ``.txt``, e.g. an ``LIDC-XML-only/`` tree) and dropped otherwise (they may be images or
    archives of any patient). Names that could land outside the download folder (absolute,
    ``..`` components, drive letters, NUL) are dropped with a warning.

    Returns:
        The selected names, sorted, and the number of patients in the list (0 when no file
        names a patient, so the limit cannot be applied).
    """
    if max_patients < 1:
        raise ValueError(f"max_patients must be at least 1, got {max_patients}")
    by_patient: dict[str, list[str]] = {}
    shared: list[str] = []
    for name in names:
        unsafe = unsafe_name_reason(name)
        if unsafe is not None:
            LOG.warning("Kaggle file %r is not downloaded: %s", name, unsafe)
            continue
        patient_ids = _PATIENT_ID.findall(name)
        if patient_ids:
            by_patient.setdefault(patient_ids[-1], []).append(name)
        elif name.lower().endswith(_SHARED_FILE_SUFFIXES):
            shared.append(name)
    chosen = sorted(by_patient)[:max_patients]
    return sorted(shared + [name for patient in chosen for name in by_patient[patient]]), len(
        by_patient
    )


def download_kaggle(
    slug: str, download_dir: Path, extract_root: Path, max_patients: int | None
) -> Path:
    """Download a Kaggle dataset (or its first patients) and return the folder to scan.

    The whole dataset is Kaggle's zip in ``download_dir/all/``, extracted safely into
    ``extract_root/<dataset>/`` (:func:`~lungct.prepare.archives.extraction_folder`). With
    ``max_patients``, the dataset's file list is read and the files of the first patients
    (:func:`select_patient_files`) are downloaded one by one into
    ``download_dir/first-<N>-patients/``, archives among them extracted beside themselves;
    when no file names a patient, or all are asked for, the whole dataset is downloaded
    instead. A completed download (marker beside its folder) is reused without contacting
    Kaggle; an interrupted one is resumed by the kaggle package. Nothing is ever deleted.

    Args:
        slug: ``owner/dataset``.
        download_dir: this dataset's download folder (``work_dir/raw_kaggle/<owner>_<dataset>``).
        extract_root: where the whole dataset's zip is extracted.
        max_patients: patients to download, or None for the whole dataset.

    Raises:
        ValueError: ``max_patients`` < 1.
        UserError: a bad slug, or any failure of the kaggle package (one sentence naming
            ``--kaggle-dataset``).
    """
    check_slug(slug)
    if max_patients is not None and max_patients < 1:
        raise ValueError(f"max_patients must be at least 1 or None, got {max_patients}")
    limited = download_dir / f"first-{max_patients}-patients"
    if max_patients is not None and read_marker(limited).get("slug") == slug:
        LOG.info("reusing the Kaggle download in %s", limited)
        return limited
    reusable = _reusable_whole_dataset(slug, download_dir / "all", extract_root, max_patients)
    if reusable is not None:
        return reusable
    api = _kaggle_call(slug, _authenticated_kaggle_api)
    n_patients = None
    if max_patients is not None:
        names = _kaggle_call(slug, _list_dataset_files, api, slug)
        selected, n_patients = select_patient_files(names, max_patients)
        if max_patients < n_patients:
            LOG.info(
                "downloading %d files of the first %d of %d patients of Kaggle dataset %s",
                len(selected), max_patients, n_patients, slug,
            )  # fmt: skip
            return _download_files(api, slug, limited, selected)
        _log_whole_dataset_reason(slug, max_patients, n_patients)
    archive = _download_whole_dataset(api, slug, download_dir / "all", n_patients)
    return extract_archive(archive, extract_root)


def _log_whole_dataset_reason(slug: str, max_patients: int, n_patients: int) -> None:
    if n_patients == 0:
        LOG.warning(
            "--max-patients %d could not be applied: no file of Kaggle dataset %s names an "
            "LIDC-IDRI patient id, so the whole dataset is used", max_patients, slug,
        )  # fmt: skip
    else:
        LOG.info("--max-patients %d covers all %d patients of %s", max_patients, n_patients, slug)


def _reusable_whole_dataset(
    slug: str, folder: Path, extract_root: Path, max_patients: int | None
) -> Path | None:
    """The extracted whole dataset when a completed download serves this request, else None."""
    record = read_marker(folder)
    if record.get("slug") != slug:
        return None
    n_patients = record.get("n_patients_listed")
    if max_patients is not None:
        if n_patients is None or max_patients < n_patients:
            return None
        _log_whole_dataset_reason(slug, max_patients, n_patients)
    archive = folder / f"{slug.split('/')[1]}.zip"
    if archive.is_file():
        LOG.info("reusing the Kaggle download %s", archive)
        return extract_archive(archive, extract_root)
    extracted = extraction_folder(archive, extract_root)
    if read_marker(extracted).get("archive", {}).get("path") == str(archive.resolve()):
        LOG.info("reusing %s (its downloaded zip has been deleted)", extracted)
        return extracted
    return None


def _download_whole_dataset(api: Any, slug: str, folder: Path, n_patients: int | None) -> Path:
    """Kaggle's zip of the whole dataset in ``folder``, downloaded unless already complete."""
    archive = folder / f"{slug.split('/')[1]}.zip"
    if read_marker(folder).get("slug") != slug or not archive.is_file():
        LOG.info("downloading the whole Kaggle dataset %s into %s", slug, folder)
        _kaggle_call(
            slug, api.dataset_download_files, slug, path=str(folder), force=False, quiet=False,
            unzip=False,
        )  # fmt: skip
    atomic_write_json(marker_path(folder), {"slug": slug, "n_patients_listed": n_patients})
    return archive


def _download_files(api: Any, slug: str, folder: Path, names: list[str]) -> Path:
    for name in tqdm(names, desc=f"Kaggle {slug}", unit="file"):
        _kaggle_call(
            slug, api.dataset_download_file, slug, name, path=str(folder), force=False,
            quiet=True, unzip=True,
        )  # fmt: skip
    refused: list[list[str]] = []
    for name in names:
        if archive_suffix(Path(name)) is not None and (folder / name).is_file():
            archive = folder / name
            extracted = extract_archive(archive, archive.parent)
            refused += [[f"{name}!/{entry}", why] for entry, why in read_refused_entries(extracted)]
    atomic_write_json(
        marker_path(folder), {"slug": slug, "files": names, "refused_entries": refused}
    )
    return folder


def _authenticated_kaggle_api() -> Any:
    # Imported here: ``import kaggle`` authenticates at import time and, in some versions,
    # raises or calls sys.exit when it finds no credentials.
    import kaggle

    kaggle.api.authenticate()
    return kaggle.api


def _list_dataset_files(api: Any, slug: str) -> list[str]:
    names: list[str] = []
    page_token = None
    while True:
        response = api.dataset_list_files(slug, page_token=page_token, page_size=_KAGGLE_PAGE_SIZE)
        if getattr(response, "error_message", ""):
            raise RuntimeError(response.error_message)
        files = list(response.files or [])
        names += [file.name for file in files]
        page_token = getattr(response, "next_page_token", "")
        if not page_token or not files:
            return names


def _kaggle_call(slug: str, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Run a kaggle package call; its prints go to the debug log, its failures to a UserError."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return function(*args, **kwargs)
    except (Exception, SystemExit) as error:
        LOG.debug("kaggle package failure: %r", error)
        raise _kaggle_error(slug, error) from error
    finally:
        if printed.getvalue().strip():
            LOG.debug("kaggle package: %s", printed.getvalue().strip())


def _kaggle_error(slug: str, error: BaseException) -> UserError:
    """One sentence saying what failed and how to fix it, naming --kaggle-dataset."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    network = type(error).__module__.split(".")[0] in ("requests", "urllib3") or isinstance(
        error, (ConnectionError, TimeoutError)
    )
    credentials_fix = (
        "renew your token at https://www.kaggle.com/settings/api and check ~/.kaggle/kaggle.json,"
        " KAGGLE_USERNAME/KAGGLE_KEY or KAGGLE_API_TOKEN"
    )
    if isinstance(error, ModuleNotFoundError) and (error.name or "").startswith("kaggle"):
        cause, fix = "the kaggle package is not installed", "pip install kaggle"
    elif isinstance(error, SystemExit):
        cause, fix = "the kaggle package rejected the credentials", credentials_fix
    elif status in (401, 403):
        cause, fix = f"HTTP {status}: access refused", credentials_fix
    elif status == 404:
        cause = "HTTP 404: no such dataset"
        fix = "check the slug given with --kaggle-dataset (owner/dataset, as in its URL)"
    elif network and status is None:
        cause = f"Kaggle could not be reached: {type(error).__name__}"
        fix = "check your network connection, or use --input DIR or --source synthetic"
    else:
        cause = f"HTTP {status}" if status is not None else describe_error(error)
        fix = "check the slug given with --kaggle-dataset, your credentials and network"
    if "--kaggle-dataset" not in fix:
        fix += " (dataset chosen with --kaggle-dataset)"
    return UserError(f"Kaggle download of {slug!r} failed ({cause}): {fix}")

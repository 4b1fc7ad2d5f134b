"""The synthetic LIDC-format cohort: real DICOM and LIDC XML, truth, determinism, reuse."""

from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lungct.errors import UserError
from lungct.synthetic import lesions, readers, scan
from lungct.synthetic.cohort import generate_cohort

NS = {"lidc": "http://www.nih.gov"}
LIDC = "{http://www.nih.gov}"  # ElementTree tag prefix of the LIDC namespace
SIZE_PX = 64
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two patients at 64 px, generated once for the module (read-only for the tests)."""
    return generate_cohort(tmp_path_factory.mktemp("synthetic") / "cohort", n_patients=2,
                           image_size_px=SIZE_PX, seed=2)


@pytest.fixture(scope="module")
def truth(cohort: Path) -> dict:
    return json.loads((cohort / "truth.json").read_text(encoding="utf-8"))


def _slices(cohort: Path, patient: dict) -> list[Path]:
    return sorted((cohort / patient["series_dir"]).glob("*.dcm"))


def _volume_hu(cohort: Path, patient: dict) -> np.ndarray:
    datasets = [pydicom.dcmread(path) for path in _slices(cohort, patient)]
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                     for ds in datasets])


def _readings(cohort: Path, patient: dict) -> ET.Element:
    return ET.parse(cohort / patient["readings_file"]).getroot()


def _all_files(folder: Path) -> dict[str, Path]:
    return {path.relative_to(folder).as_posix(): path
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_layout_is_classic_lidc(cohort, truth):
    """Patient / StudyInstanceUID / SeriesInstanceUID / slices + an NNN.xml not named by patient."""
    assert [p["patient_id"] for p in truth["patients"]] == ["LIDC-IDRI-9001", "LIDC-IDRI-9002"]
    for patient in truth["patients"]:
        series_dir = cohort / patient["series_dir"]
        assert series_dir.parts[-3:] == (patient["patient_id"], patient["study_instance_uid"],
                                         patient["series_instance_uid"])
        assert len(_slices(cohort, patient)) == scan.SLICES_PER_PATIENT
        (xml_file,) = series_dir.glob("*.xml")
        assert len(xml_file.stem) == 3 and xml_file.stem.isdigit()


def test_slices_are_valid_ct_dicom_with_the_listed_tags(cohort, truth):
    """Every slice is CT Image Storage, Explicit VR LE, with the tags docs/lidc_format.md lists."""
    patient = truth["patients"][0]
    for index, path in enumerate(_slices(cohort, patient)):
        ds = pydicom.dcmread(path)  # not forced: preamble, DICM prefix and file meta present
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID == patient["patient_id"]
        assert ds.StudyInstanceUID == patient["study_instance_uid"]
        assert ds.SeriesInstanceUID == patient["series_instance_uid"]
        assert (ds.Rows, ds.Columns, ds.SamplesPerPixel) == (SIZE_PX, SIZE_PX, 1)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
            16, 16, 15, 1)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert ds.PixelPaddingValue == -2000
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == scan.SLICE_THICKNESS_MM
        assert ds.InstanceNumber == index + 1
        assert float(ds.ImagePositionPatient[2]) == patient["slice_z_mm"][index]
        assert float(ds.PixelSpacing[0]) * SIZE_PX == pytest.approx(350.0, abs=0.01)


def test_uids_are_unique_and_z_steps_by_the_slice_thickness(cohort, truth):
    """SOP Instance UIDs differ per slice and z falls by one slice thickness per instance."""
    patient = truth["patients"][1]
    datasets = [pydicom.dcmread(path, stop_before_pixels=True)
                for path in _slices(cohort, patient)]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
    np.testing.assert_allclose(np.diff(z), -scan.SLICE_THICKNESS_MM)


def test_tissues_have_realistic_hu(cohort, truth):
    """Air ~ -1000, lung -950..-700 with texture, soft tissue 0..80 and bone > 300 HU."""
    expected = {"air": (-1030, -970), "lung": (-950, -700), "soft_tissue": (0, 80),
                "bone": (300, 1200)}
    for patient in truth["patients"]:
        volume = _volume_hu(cohort, patient)
        for tissue, (low, high) in expected.items():
            point = patient["reference_px"][tissue]
            k, row, col = point["slice_index"], point["row"], point["col"]
            roi = volume[k, row - 1:row + 2, col - 1:col + 2]
            assert low <= float(np.median(roi)) <= high, (tissue, roi)
        lung = patient["reference_px"]["lung"]
        column = volume[:, lung["row"], lung["col"]]
        assert column.std() > 10  # parenchyma is textured, not flat


def test_padding_marks_the_outside_of_the_scan_circle(cohort, truth):
    """Stored values outside the scan circle equal PixelPaddingValue; inside, none do."""
    ds = pydicom.dcmread(_slices(cohort, truth["patients"][0])[0])
    stored = ds.pixel_array
    axis = np.arange(SIZE_PX) - (SIZE_PX - 1) / 2
    outside = axis[:, None] ** 2 + axis[None, :] ** 2 > (SIZE_PX / 2) ** 2
    assert (stored[outside] == ds.PixelPaddingValue).all()
    assert (stored[~outside] != ds.PixelPaddingValue).all()


def test_readings_xml_has_the_lidc_structure(cohort, truth):
    """LidcReadMessage in the NIH namespace, the series header, four reading sessions."""
    patient = truth["patients"][0]
    root = _readings(cohort, patient)
    assert root.tag == f"{LIDC}LidcReadMessage"
    header = root.find("lidc:ResponseHeader", NS)
    assert header.findtext("lidc:SeriesInstanceUid", namespaces=NS) == (
        patient["series_instance_uid"])
    assert header.findtext("lidc:StudyInstanceUID", namespaces=NS) == (
        patient["study_instance_uid"])
    sessions = root.findall("lidc:readingSession", NS)
    assert len(sessions) == 4
    for session in sessions:
        assert session.findtext("lidc:servicingRadiologistID", namespaces=NS)
        for nodule in session.findall("lidc:unblindedReadNodule", NS):
            assert nodule.findtext("lidc:noduleID", namespaces=NS)
            for roi in nodule.findall("lidc:roi", NS):
                assert roi.findtext("lidc:inclusion", namespaces=NS) in ("TRUE", "FALSE")
                points = [(int(edge.findtext("lidc:xCoord", namespaces=NS)),
                           int(edge.findtext("lidc:yCoord", namespaces=NS)))
                          for edge in roi.findall("lidc:edgeMap", NS)]
                assert points and all(0 <= v < SIZE_PX for point in points for v in point)


def test_characteristics_hold_all_nine_ratings_in_lidc_ranges(cohort, truth):
    """Every characteristics block has the nine ratings, each within its LIDC range."""
    ranges = {"subtlety": 5, "internalStructure": 4, "calcification": 6, "sphericity": 5,
              "margin": 5, "lobulation": 5, "spiculation": 5, "texture": 5, "malignancy": 5}
    blocks = [block for patient in truth["patients"]
              for block in _readings(cohort, patient).iter(f"{LIDC}characteristics")]
    assert blocks
    for block in blocks:
        ratings = {child.tag.split("}")[1]: int(child.text) for child in block}
        assert set(ratings) == set(ranges)
        assert all(1 <= ratings[name] <= high for name, high in ranges.items())


def test_roi_and_non_nodule_positions_match_real_slices(cohort, truth):
    """Every imageSOP_UID is a slice of the series and its imageZposition is that slice's z."""
    for patient in truth["patients"]:
        z_by_uid = {}
        for path in _slices(cohort, patient):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            z_by_uid[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
        root = _readings(cohort, patient)
        marks = [*root.iter(f"{LIDC}roi"), *root.iter(f"{LIDC}nonNodule")]
        assert marks
        for mark in marks:
            uid = mark.findtext("lidc:imageSOP_UID", namespaces=NS)
            assert z_by_uid[uid] == float(mark.findtext("lidc:imageZposition", namespaces=NS))


def test_small_nodules_and_non_nodules_are_single_points(cohort, truth):
    """Marks without characteristics have one edgeMap per roi; non-nodules one locus."""
    roots = [_readings(cohort, patient) for patient in truth["patients"]]
    small = [nodule for root in roots for nodule in root.iter(f"{LIDC}unblindedReadNodule")
             if nodule.find("lidc:characteristics", NS) is None]
    non_nodules = [mark for root in roots for mark in root.iter(f"{LIDC}nonNodule")]
    assert small and non_nodules
    for nodule in small:
        assert all(len(roi.findall("lidc:edgeMap", NS)) == 1
                   for roi in nodule.findall("lidc:roi", NS))
    for non_nodule in non_nodules:
        assert non_nodule.findtext("lidc:nonNoduleID", namespaces=NS)
        assert len(non_nodule.findall("lidc:locus", NS)) == 1


def test_truth_ratings_match_the_xml(cohort, truth):
    """truth.json holds each reader's XML ratings under that reader's own noduleID."""
    checked = 0
    for patient in truth["patients"]:
        sessions = _readings(cohort, patient).findall("lidc:readingSession", NS)
        for lesion in patient["lesions"]:
            if lesion["kind"] == "non_nodule":
                continue
            for reading in lesion["readings"]:
                session = sessions[reading["reader"]]
                (element,) = [n for n in session.findall("lidc:unblindedReadNodule", NS)
                              if n.findtext("lidc:noduleID", namespaces=NS) == reading["mark_id"]]
                block = element.find("lidc:characteristics", NS)
                in_xml = None if block is None else {
                    child.tag.split("}")[1]: int(child.text) for child in block}
                assert in_xml == reading["characteristics"]
                checked += 1
    assert checked > 0


def test_truth_labels_follow_the_default_rule(truth):
    """label = median of the rating readers' malignancy: >= 4 cancer, <= 2 non-cancer."""
    nodules = [lesion for patient in truth["patients"] for lesion in patient["lesions"]
               if lesion["kind"] == "nodule"]
    assert nodules
    for nodule in nodules:
        ratings = [r["characteristics"]["malignancy"] for r in nodule["readings"]
                   if r["characteristics"] is not None]
        if not ratings:
            assert nodule["label"] == "unrated"
            continue
        median = statistics.median(ratings)
        assert nodule["median_malignancy"] == median
        expected = "cancer" if median >= 4 else "non_cancer" if median <= 2 else "excluded"
        assert nodule["label"] == expected


def test_reader_nodule_ids_are_local_to_each_reader(truth):
    """The readers of one nodule give it different ids (ids are local to a reader)."""
    shared = [lesion for patient in truth["patients"] for lesion in patient["lesions"]
              if len(lesion["readings"]) >= 2]
    assert shared
    for lesion in shared:
        ids = [reading["mark_id"] for reading in lesion["readings"]]
        assert len(set(ids)) == len(ids)


def test_nodules_lie_in_the_lungs_and_show_in_the_pixels(cohort, truth):
    """Nodules of >= 10 mm are denser than lung at their centre pixel, inside the lung field."""
    for patient in truth["patients"]:
        volume = _volume_hu(cohort, patient)
        for lesion in patient["lesions"]:
            if lesion["kind"] != "nodule" or lesion["diameter_mm"] < 10:
                continue
            centre = lesion["centre_px"]
            k, row, col = centre["slice_index"], round(centre["row"]), round(centre["col"])
            assert volume[k, row, col] > -750
            assert lesion["texture"] in ("solid", "part_solid", "ground_glass")
            assert 3.0 <= lesion["diameter_mm"] <= 30.0


def test_summary_counts_the_truth(truth):
    """The summary's nodule counts add up to the nodules listed per patient."""
    summary = truth["summary"]
    outcomes = sum(summary[f"nodules_{name}"] for name in
                   ("cancer", "non_cancer", "excluded", "unrated"))
    listed = sum(lesion["kind"] == "nodule" for patient in truth["patients"]
                 for lesion in patient["lesions"])
    assert outcomes == summary["nodules"] == listed
    assert summary["slices_cancer"] == sum(len(p["slices"]["cancer"]) for p in truth["patients"])


def test_both_kinds_of_patients_are_recorded(truth):
    """truth.json flags each patient cancer-free or not; the seed-2 pair holds one of each."""
    flags = [patient["cancer_free"] for patient in truth["patients"]]
    assert flags == [True, False]
    assert truth["summary"]["patients_cancer_free"] == 1


def test_cancer_free_patients_have_no_nodule_rated_above_3(truth):
    """Every nodule of a cancer-free patient has a readers' median <= 3 and no cancer slice."""
    cancer_free = [patient for patient in truth["patients"] if patient["cancer_free"]]
    nodules = [lesion for patient in cancer_free for lesion in patient["lesions"]
               if lesion["kind"] == "nodule"]
    assert len(nodules) >= 5
    assert all(nodule["median_malignancy"] is None or nodule["median_malignancy"] <= 3
               for nodule in nodules)
    assert all(not patient["slices"]["cancer"] for patient in cancer_free)


def test_benign_shapes_stay_below_the_bound_at_every_size():
    """Benign-end shapes of 3-30 mm nodules score <= the bound and are never part-solid."""
    rng = np.random.default_rng(0)
    for diameter_mm in (3.0, 10.0, 20.0, 30.0):
        for _ in range(50):
            texture, calcified, spiculation, lobulation = lesions._benign_shape(diameter_mm, rng)
            assert texture != "part_solid"
            assert lesions._shape_score(diameter_mm, spiculation, lobulation, calcified,
                                        texture) <= lesions.BENIGN_MAX_SHAPE_SCORE


def test_latent_malignancy_is_the_shape_score_plus_a_nodule_term():
    """The latent malignancy is the shape score plus one N(0, 0.5) draw, for every patient."""
    shape = (20.0, 0.1, 0.2, True, "solid")
    latent = lesions._latent_malignancy(*shape, np.random.default_rng(4))
    expected = lesions._shape_score(*shape) + np.random.default_rng(4).normal(0.0, 0.5)
    assert latent == pytest.approx(expected)
    assert lesions._shape_score(*shape) == pytest.approx(3.5 + 0.55 * 8 / 6 - 1.0 - 0.32 - 2.2)


def test_generation_is_byte_identical_for_the_same_arguments(cohort, tmp_path):
    """A second generation with the same seed writes exactly the same files."""
    again = generate_cohort(tmp_path / "again", n_patients=2, image_size_px=SIZE_PX, seed=2)
    first, second = _all_files(cohort), _all_files(again)
    assert first.keys() == second.keys()
    assert all(first[name].read_bytes() == second[name].read_bytes() for name in first)


def test_same_parameters_reuse_the_cohort(tmp_path):
    """A second call with the same parameters rewrites nothing."""
    out = generate_cohort(tmp_path / "c", n_patients=1, image_size_px=SIZE_PX, seed=1)
    before = {name: path.stat().st_mtime_ns for name, path in _all_files(out).items()}
    generate_cohort(tmp_path / "c", n_patients=1, image_size_px=SIZE_PX, seed=1)
    after = {name: path.stat().st_mtime_ns for name, path in _all_files(out).items()}
    assert after == before


def test_changed_parameters_regenerate_and_keep_foreign_files(tmp_path):
    """Other parameters: the old patients go, files this module did not write stay."""
    out = generate_cohort(tmp_path / "c", n_patients=2, image_size_px=SIZE_PX, seed=1)
    foreign = out / "LIDC-IDRI-9002" / "notes.txt"
    foreign.write_text("mine", encoding="utf-8")
    generate_cohort(out, n_patients=1, image_size_px=SIZE_PX, seed=1)
    assert json.loads((out / "cohort.json").read_text(encoding="utf-8"))["n_patients"] == 1
    assert foreign.read_text(encoding="utf-8") == "mine"
    assert not list((out / "LIDC-IDRI-9002").rglob("*.dcm"))
    assert len(list((out / "LIDC-IDRI-9001").rglob("*.dcm"))) == scan.SLICES_PER_PATIENT


def test_missing_marker_regenerates(tmp_path):
    """Without cohort.json (an interrupted run) the cohort is written again, then marked."""
    out = generate_cohort(tmp_path / "c", n_patients=1, image_size_px=SIZE_PX, seed=1)
    (out / "cohort.json").unlink()
    stale = next(out.rglob("*.dcm"))
    stale.write_bytes(b"half-written")
    generate_cohort(out, n_patients=1, image_size_px=SIZE_PX, seed=1)
    assert pydicom.dcmread(stale).Modality == "CT"
    assert (out / "cohort.json").exists()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"n_patients": 0}, "n_patients must be an integer from 1 to 999, got 0"),
    ({"image_size_px": 16}, "image_size_px must be an integer from 48 to 1024, got 16"),
    ({"seed": -1}, "seed must be a non-negative integer, got -1"),
])
def test_bad_arguments_are_refused(tmp_path, arguments, message):
    """Out-of-range arguments raise ValueError naming the value."""
    with pytest.raises(ValueError, match=message):
        generate_cohort(tmp_path / "c", **arguments)


def test_unwritable_folder_is_a_user_error(tmp_path):
    """An output path that is a file gives one clear UserError."""
    target = tmp_path / "file"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="cannot write the synthetic cohort to"):
        generate_cohort(target, n_patients=1, image_size_px=SIZE_PX)


def _rendered(lesion_kwargs: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU, occupancy and distance from the centre (px) around one 16 mm lesion drawn into
    flat lung at 256 px, on its centre slice."""
    geometry = scan.make_geometry(256, np.random.default_rng(0))
    k = len(geometry.z_mm) // 2
    centre_mm = float(geometry.axis_mm[128])  # on a pixel centre
    hu = np.full((len(geometry.z_mm), 256, 256), -860.0, dtype=np.float32)
    lesion = lesions.Lesion(kind="nodule", centre_mm=(centre_mm, centre_mm, geometry.z_mm[k]),
                             diameter_mm=16.0, axes=(1.0, 1.0, 1.0), rotation=np.eye(3),
                             **lesion_kwargs)
    footprint = lesions.render_lesion(hu, geometry, lesion)
    k0, r0, c0 = footprint.start
    occupancy = footprint.occupancy[k - k0]
    rows, cols = np.indices(occupancy.shape)
    distance_px = np.hypot(rows + r0 - 128, cols + c0 - 128)
    return hu[k, r0:r0 + occupancy.shape[0], c0:c0 + occupancy.shape[1]], occupancy, distance_px


def test_spicules_reach_beyond_the_nodule_body():
    """A spiculated nodule has dense pixels far outside its radius; a smooth one has none."""
    radius_px = 8.0 / scan.FIELD_OF_VIEW_MM * 256
    spikes = {"spiculation": 0.8, "spicule_dirs": np.array([[1.0, 0, 0], [0, -1.0, 0]]),
              "spicule_lengths_mm": np.array([8.0, 8.0])}
    spiculated, _, distance_px = _rendered(spikes)
    assert (spiculated[distance_px > 1.4 * radius_px] > -500).sum() >= 4
    smooth, _, distance_px = _rendered({})
    assert (smooth[distance_px > 1.2 * radius_px] > -500).sum() == 0


def test_textures_and_calcification_have_their_hu():
    """Ground glass is hazy (-600..-300 HU); a calcified core is very bright (> 500 HU)."""
    ground_glass, occupancy, _ = _rendered({"texture": "ground_glass", "solid_fraction": 0.0,
                                            "tissue_hu": -450.0})
    assert -600 <= float(np.median(ground_glass[occupancy > 0.9])) <= -300
    calcified, occupancy, _ = _rendered({"calcification": "central", "calcium_fraction": 0.5,
                                         "calcium_hu": 900.0})
    assert calcified[occupancy > 0.5].max() > 500


def test_lobulation_bumps_the_outline():
    """Lobulation makes the outline's radius vary around the nodule; a sphere's barely does."""
    def radius_spread(kwargs: dict) -> float:
        _, occupancy, distance_px = _rendered(kwargs)
        edge = (occupancy > 0.5) & ~np.pad(
            (occupancy > 0.5)[1:-1, 1:-1] & (occupancy > 0.5)[:-2, 1:-1]
            & (occupancy > 0.5)[2:, 1:-1] & (occupancy > 0.5)[1:-1, :-2]
            & (occupancy > 0.5)[1:-1, 2:], 1)
        return float(distance_px[edge].std())

    lobes = np.array([[1.0, 0, 0], [-0.5, 0.87, 0], [-0.5, -0.87, 0], [0, 0, 1.0]])
    assert radius_spread({"lobulation": 1.0, "lobe_dirs": lobes}) > 2 * radius_spread({})


def test_cavity_is_outlined_as_a_hole():
    """A reader who outlines holes marks a cavitated nodule's air with an inclusion FALSE roi."""
    geometry = scan.make_geometry(256, np.random.default_rng(0))
    k = len(geometry.z_mm) // 2
    hu = np.full((len(geometry.z_mm), 256, 256), -860.0, dtype=np.float32)
    lesion = lesions.Lesion(kind="nodule", centre_mm=(0.0, 0.0, geometry.z_mm[k]),
                             diameter_mm=20.0, axes=(1.0, 1.0, 1.0), rotation=np.eye(3),
                             cavity_radius_mm=4.0)
    footprint = lesions.render_lesion(hu, geometry, lesion)
    reader = readers._Reader("1", "{:d}", 1, {}, threshold=0.5, outlines_holes=True)
    rois = readers._outline(footprint, lesion, reader, geometry, np.random.default_rng(0))
    holes = [roi for roi in rois if not roi.inclusion]
    assert holes and all(roi.slice_index in {r.slice_index for r in rois if r.inclusion}
                         for roi in holes)
    assert hu[k, 127:129, 127:129].max() < -900  # the cavity is air

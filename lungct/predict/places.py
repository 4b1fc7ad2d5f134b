"""Where the model looks in one series: the candidates rendered and scored.

A slice-view model scores every slice. A patch-view model looks, in this order of preference,
at the centres of a ``--nodules`` CSV, at the nodules of LIDC XML readings found in the input
(candidates made by exactly prepare's rule, :func:`lungct.prepare.candidates.lidc_candidates`:
per slice, the centre of the consensus mask of its chosen nodule), or, with neither, at a
sliding window over the lung field (stride half a patch), which is not a validated detector.
"""

from __future__ import annotations

from lungct.predict.nodules_csv import NoduleCentre, centre_candidates
from lungct.prepare.candidates import Candidate, display_path, lidc_candidates
from lungct.prepare.lidc import LabelRule
from lungct.prepare.lidc_xml import Readings
from lungct.prepare.series import Series

__all__ = ["PLACE_SOURCES", "SLIDING_WINDOW_NOTICE", "choose_places", "slice_candidates"]

#: How the places of a series were chosen, as series.json and summary.csv say it.
PLACE_SOURCES = ("every_slice", "nodules_csv", "lidc_xml", "sliding_window")
SLIDING_WINDOW_NOTICE = ("sliding window over the lung field: the model was trained on nodule "
                         "patches, so this map is not a validated detector")


def slice_candidates(series: Series) -> list[Candidate]:
    """One candidate per slice of ``series`` (slice view), in z order."""
    return [Candidate(source_path=h.path, source_file=display_path(str(h.path)),
                      patient_id=series.patient_id, label=0, negative_kind="",
                      series_uid=series.series_uid, slice_z_mm=h.z_mm,
                      pixel_spacing_mm=h.pixel_spacing_mm,
                      slice_thickness_mm=h.slice_thickness_mm, manufacturer=h.manufacturer,
                      convolution_kernel=h.convolution_kernel, lossy=h.lossy, header=h,
                      stack=series.stack)
            for h in series.slices]


def _xml_candidates(series: Series, readings: Readings, rule: LabelRule) -> list[Candidate]:
    """prepare's candidates of ``series`` that hold a nodule (a consensus-mask centre)."""
    found, _, _, _ = lidc_candidates(series, readings, rule, 0.0,
                                     lambda path: display_path(str(path)))
    return [c for c in found if c.centre_xy_px is not None]


def choose_places(series: Series, view: str, readings: Readings | None, rule: LabelRule,
                  nodules: list[NoduleCentre] | None) -> tuple[str, list[Candidate], list[str]]:
    """The place source (one of :data:`PLACE_SOURCES`), the candidates and warnings.

    For ``sliding_window`` no candidates are returned: the renderer makes them per slice
    from the lung field it finds.
    """
    if view == "slice":
        return "every_slice", slice_candidates(series), []
    if nodules is not None:
        candidates, warnings = centre_candidates(series, nodules)
        if not candidates:
            warnings.append("no --nodules row names this series")
        return "nodules_csv", candidates, warnings
    if readings is not None:
        candidates = _xml_candidates(series, readings, rule)
        warnings = [] if candidates else ["its LIDC readings outline no nodule the label rule "
                                          "keeps"]
        return "lidc_xml", candidates, warnings
    return "sliding_window", [], [SLIDING_WINDOW_NOTICE]

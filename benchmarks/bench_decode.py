#!/usr/bin/env python3
"""Decode speed per transfer syntax through lungct's read path (one worker).

One synthetic 512 x 512 CT slice (the built-in cohort's middle slice) is transcoded
losslessly to each syntax: RLE, JPEG-LS and JPEG 2000 by pydicom's encoders, JPEG Lossless
(process 14 and its selection value 1) by GDCM, Deflate by pydicom's writer. Each figure is
``lungct.prepare.render.read_hu`` (read, checks, decode, HU with padding to air) on ``--reads``
copies of the file, median of ``--repeats`` runs, in slices per second. Syntaxes that more
than one installed plugin decodes are also timed per plugin (the ``PREFERRED_PLUGINS`` order
of :mod:`lungct.prepare.decoders` comes from these figures). Every decode is checked to give
the uncompressed slice's HU. Prints JSON (and writes it to ``--out``).

    python benchmarks/bench_decode.py --out benchmarks/out/decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import gdcm
import numpy as np
import pydicom
from pydicom.pixels import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from lungct.prepare import decoders, render
from lungct.synthetic.cohort import generate_cohort

SYNTAXES = (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless,
            JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1)
_GDCM_SYNTAX = {JPEGLossless: gdcm.TransferSyntax.JPEGLosslessProcess14,
                JPEGLosslessSV1: gdcm.TransferSyntax.JPEGLosslessProcess14_1}


def transcode(plain: Path, syntax: str, target: Path) -> Path:
    """A lossless copy of ``plain`` in ``syntax`` at ``target``."""
    shutil.copy(plain, target)
    if syntax in _GDCM_SYNTAX:
        reader = gdcm.ImageReader()
        reader.SetFileName(str(target))
        if not reader.Read():
            raise RuntimeError(f"GDCM could not read {plain}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(_GDCM_SYNTAX[syntax]))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM could not transcode to {syntax.name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(target))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.Write()
        return target
    ds = pydicom.dcmread(target)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax)
    ds.save_as(target)
    return target


def slices_per_second(paths: list[Path], repeats: int) -> float:
    """Median over ``repeats`` of len(paths) / seconds to read_hu every path."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            render.read_hu(path)
        rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reads", type=int, default=30, help="files decoded per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("benchmarks/out/bench_decode_cohort"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/decode.json"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    generate_cohort(args.cache, n_patients=1, image_size_px=512, seed=0)
    slices = sorted(args.cache.rglob("*.dcm"))
    plain = slices[len(slices) // 2]
    expected, _ = render.read_hu(plain)
    preferred = decoders.PREFERRED_PLUGINS
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for syntax in SYNTAXES:
            folder = Path(scratch) / syntax
            folder.mkdir()
            first = transcode(plain, syntax, folder / "0.dcm")
            paths = [first] + [Path(shutil.copy(first, folder / f"{i}.dcm"))
                               for i in range(1, args.reads)]
            if not np.array_equal(render.read_hu(first)[0], expected):
                raise AssertionError(f"{syntax.name}: HU differ from the uncompressed slice")
            plugins = (get_decoder(syntax).available_plugins
                       if syntax.is_compressed and syntax != RLELossless else ("lungct",))
            rates = {}
            for plugin in sorted(plugins):  # "lungct": no codec plugin (plain, deflate, RLE)
                decoders.PREFERRED_PLUGINS = (plugin,)
                rates[plugin] = round(slices_per_second(paths, args.repeats), 1)
            decoders.PREFERRED_PLUGINS = preferred
            default = next((p for p in preferred if p in plugins), "lungct")
            results[syntax.name] = {
                "uid": str(syntax), "file_bytes": first.stat().st_size,
                "slices_per_s": rates[default],
                "decoded_by": default, "per_plugin_slices_per_s": rates}
    report = {"benchmark": "decode", "slice_px": list(expected.shape), "reads": args.reads,
              "repeats": args.repeats, "workers": 1, "python": platform.python_version(),
              "pydicom": pydicom.__version__, "results": results}
    text = json.dumps(report, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

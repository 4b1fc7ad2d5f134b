"""The built-in synthetic LIDC-IDRI-format cohort: CT DICOM series + LIDC XML readings.

The pipeline's offline default and the fixture of the stage tests. It writes real files that
a reader of LIDC-IDRI (Armato et al. 2011, Med. Phys. 38:915) accepts, so synthetic data goes
through exactly the code real data goes through (docs/lidc_format.md is the contract):

``out_dir/LIDC-IDRI-9001/<StudyInstanceUID>/<SeriesInstanceUID>/000001.dcm ... + NNN.xml``

Each patient is one CT series of a 3D chest slab (air, body outline, subcutaneous fat, muscle,
ribs, spine, heart, aorta, two textured lungs, vessels that look like nodules on a single axial
slice) with nodules of 3-30 mm rendered in 3D: solid, part-solid or ground glass; smooth,
lobulated (bumps), spiculated (thin radiating spikes) or calcified (a very bright core), some
cavitated. Four simulated radiologists read every series: they miss some small nodules, outline
each nodule with their own threshold, and rate the nine LIDC characteristics around the true
shape with reader bias and noise. The latent malignancy follows shape (spiculation, lobulation,
calcification, solidity) more than size, so a size-only baseline is weak by construction
(``benchmarks/bench_synthetic_acceptance.py`` measures both). About ``CANCER_FREE_FRACTION``
of the patients are cancer-free by design: their nodules are drawn from the benign end of the
same shape parameters (no part-solid texture, calcified more often, smooth), so their readers'
median malignancy stays <= 3 while labels still follow shape. ``truth.json`` records each
patient's ``cancer_free`` flag, the true parameters of every lesion and every reader's
ratings; ``cohort.json`` (written last) marks a complete cohort, so a second call with the
same parameters reuses it.

Modules: ``scan`` (acquisition constants, pixel grid, noise, stored values), ``anatomy``
(chest, lungs, vessels, bones), ``lesions`` (nodule shapes and malignancy), ``readers``
(simulated radiologists and the LIDC XML), ``files`` (DICOM writing, reuse and clean-up),
``truth`` (truth.json content) and ``cohort`` (:func:`lungct.synthetic.cohort.generate_cohort`).
"""

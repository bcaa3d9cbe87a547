"""The frozen-encoder benchmarks of ``bony evaluate``, one module each: the seed's protocol, and the field's beside it.

- :mod:`.panda`: PANDA tile classes (the seed's MLP, eva's linear probe, weighted k-NN), split by slide;
- :mod:`.deepgleason`: DeepGleason masks decoded from the embedding (the seed's MSE; Dice and mIoU of a class
  decoder, and of one on patch tokens);
- :mod:`.sicapv2`: the blurred SICAPv2 tile decoded (the seed's MSE; PSNR, SSIM) and patch Gleason grading on
  the official partition;
- :mod:`.isup`: slide-level ISUP grade by gated attention-MIL (beyond the seed);
- :mod:`.images`: a folder of labelled images (a tissue microarray), each image's class by k-fold
  cross-validation with k-NN and the linear probe.

Each is a class with the :class:`~bonylib.evaluation.benchmarks.common.Benchmark` interface, built from its
config section; :data:`BENCHMARKS` names them for the config's ``benchmarks`` list.
"""

from __future__ import annotations

from bonylib.evaluation.benchmarks.deepgleason import DeepGleasonMasks
from bonylib.evaluation.benchmarks.images import ImageClasses
from bonylib.evaluation.benchmarks.isup import SlideIsup
from bonylib.evaluation.benchmarks.panda import PandaTiles
from bonylib.evaluation.benchmarks.sicapv2 import Sicapv2

BENCHMARKS = {cls.name: cls for cls in (PandaTiles, DeepGleasonMasks, Sicapv2, SlideIsup, ImageClasses)}
"""Benchmark classes by the name the config's ``benchmarks`` list and section use."""

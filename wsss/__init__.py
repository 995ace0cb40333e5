"""wsss: weakly supervised semantic segmentation from image-level labels.

stage 1 (`wsss.erasing`): classifier, CAM, adversarial erasing -> mined object regions;
stage 2 (`wsss.pseudo`): saliency fusion and dense CRF -> pseudo-masks;
stage 3 (`wsss.methods`: STC, PSL, ...): segmentation nets trained on them; `python -m wsss.eval` scores them.
The modules are layered, each importing only from the layers below it (README, "Module map"):
algorithms, the run's artifacts, the engine, the stages and methods, the command lines.
Importing the package does no work and does not import torch.
"""
__version__ = "0.1.0"

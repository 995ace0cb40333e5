"""Networks: dilated backbones, the CAM classifier (stage 1) and the segmentation nets (stage 3)."""
from wsss.models.backbones import BACKBONES, build_backbone, imagenet_classifier
from wsss.models.classifier import CAMClassifier, build_classifier
from wsss.models.segnet import SegNet, build_segnet

__all__ = ["BACKBONES", "CAMClassifier", "SegNet", "build_backbone", "build_classifier", "build_segnet",
           "imagenet_classifier"]

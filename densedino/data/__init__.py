"""Data: the built-in procedural dataset (and, from other modules, views and folders)."""

from densedino.data.demo_dataset import DemoDatasetInfo, save_preview, write_demo_dataset
from densedino.data.synthetic import CLASSES, IGNORE_INDEX, PALETTE, render_scene, scene_rng

__all__ = [
    "CLASSES",
    "IGNORE_INDEX",
    "PALETTE",
    "DemoDatasetInfo",
    "render_scene",
    "save_preview",
    "scene_rng",
    "write_demo_dataset",
]

"""Constants shared by training, evaluation and serving: ImageNet statistics, the VOC colours.

One home for numbers that several stages must agree on; the transforms that use them live in
:mod:`densedino.data.eval_transform` (inference) and :mod:`densedino.data.view_config`
(training views).
"""

from __future__ import annotations

# Per-channel RGB mean and standard deviation of ImageNet, on pixels scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def voc_palette(num_entries: int = 256) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map: entry 0 black, 1 dark red, 2 dark green, ..., 255 cream."""
    palette = []
    for index in range(num_entries):
        red = green = blue = 0
        value = index
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((red, green, blue))
    return palette

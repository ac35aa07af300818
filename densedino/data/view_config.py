"""Which training views to make: :class:`ViewConfig` and its presets (DINO, the DenseDINO paper,
the DenseDINO authors' README recipe)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from densedino.data.constants import IMAGENET_MEAN, IMAGENET_STD
from densedino.data.photometric import DINO_GRAYSCALE_P, DINO_HUE


def _as_pair(value: Sequence[float], name: str) -> tuple[float, float]:
    """Return ``value`` as a tuple of two floats or raise a ValueError naming ``name``."""
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must have 2 values, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ViewConfig:
    """Which views to make and how.

    The first ``num_teacher`` views are the teacher views (they are global views). Every crop is
    re-sampled (at most ``max_tries`` candidates) until its intersection with each earlier global
    crop exceeds ``min_intersection`` (``min_intersection_global`` between two global crops) times
    the image area; when no candidate does, the crop falls back to the smallest box containing
    all earlier global crops (it maximises every intersection, so it meets the bound whenever any
    box can) and the fallback is counted.

    Reference points of a pair of views (``points_per_pair`` of them):

    - ``point_mode="random"``: ``num_points`` points drawn uniformly in the overlap box (the
      authors' ``--num_reference`` in their random mode);
    - ``point_mode="grid"``: the ``grid_side`` x ``grid_side`` cell centres of the overlap box
      (row-major, x fastest), ``grid_side ** 2`` points (the authors' ``--num_reference`` in
      their grid mode). ``num_points`` is not used; ``grid_side`` is required here and refused
      in random mode.

    ``hue`` (maximum hue shift, a fraction of the colour wheel) and ``grayscale_p`` default to
    DINO's 0.1 and 0.2; data whose colours carry no meaning can ask for stronger ones.
    """

    num_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    num_local: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    num_teacher: int = 2
    num_points: int = 4
    point_mode: Literal["random", "grid"] = "random"
    grid_side: int | None = None
    min_intersection: float = 0.01
    min_intersection_global: float = 0.02
    max_tries: int = 100
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    photometric: bool = True
    hue: float = DINO_HUE
    grayscale_p: float = DINO_GRAYSCALE_P
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list inputs (e.g. from config files) to tuples in place.
        for name in ("global_scale", "local_scale", "ratio"):
            object.__setattr__(self, name, _as_pair(getattr(self, name), name))
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {values!r}")
            object.__setattr__(self, name, values)
        self._validate()

    def _validate(self) -> None:
        """Raise a ValueError describing the first invalid field."""
        if self.num_global < 1:
            raise ValueError(f"num_global must be >= 1, got {self.num_global}")
        if self.num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {self.num_local}")
        if not 1 <= self.num_teacher <= self.num_global:
            raise ValueError(
                f"num_teacher must be in [1, num_global={self.num_global}] (teacher views are "
                f"global views), got {self.num_teacher}"
            )
        for name in ("global_size", "local_size", "num_points", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        self._validate_points()
        for name in ("min_intersection", "min_intersection_global"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("flip_p", "grayscale_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(
                f"hue must be in [0, 0.5] (a fraction of the colour wheel), got {self.hue}"
            )
        if any(s <= 0.0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")

    def _validate_points(self) -> None:
        """``point_mode`` and the one count that goes with it (see the class doc)."""
        if self.point_mode == "random":
            if self.grid_side is not None:
                raise ValueError(
                    f"grid_side={self.grid_side} is for point_mode='grid'; random mode draws "
                    f"num_points={self.num_points} points per pair"
                )
        elif self.point_mode == "grid":
            if self.grid_side is None or self.grid_side < 1:
                raise ValueError(
                    "point_mode='grid' needs grid_side >= 1 (grid_side ** 2 points per pair; "
                    f"num_points is the count of random points), got grid_side={self.grid_side}"
                )
        else:
            raise ValueError(f"point_mode must be 'random' or 'grid', got {self.point_mode!r}")

    @property
    def num_views(self) -> int:
        """Total number of views V."""
        return self.num_global + self.num_local

    @property
    def points_per_pair(self) -> int:
        """K': ``num_points`` in random mode, ``grid_side ** 2`` in grid mode."""
        if self.point_mode == "grid" and self.grid_side is not None:  # grid needs grid_side
            return self.grid_side**2
        return self.num_points

    @property
    def view_sizes(self) -> tuple[int, ...]:
        """Side length in pixels of each view, globals first."""
        return (self.global_size,) * self.num_global + (self.local_size,) * self.num_local

    @classmethod
    def dino(cls, num_local: int = 8) -> ViewConfig:
        """DINO multi-crop: 2 global 224 px views (scale 0.4-1) + ``num_local`` 96 px views."""
        return cls(
            num_global=2,
            num_local=num_local,
            global_scale=(0.4, 1.0),
            local_scale=(0.05, 0.4),
            global_size=224,
            local_size=96,
        )

    @classmethod
    def paper(cls) -> ViewConfig:
        """DenseDINO paper: 4 global 224 px views (2 teachers), 4 random points per pair.

        Views 3 and 4 follow DINO's global-2 recipe and the 2 % global overlap bound.
        """
        return cls(num_global=4, num_local=0, num_teacher=2, num_points=4, point_mode="random")

    @classmethod
    def authors(cls) -> ViewConfig:
        """The authors' README recipe: 2 teacher views + 4 more views, all 224 px, scale 0.25-1.

        The 4 extra views are the code's "local" crops (local recipe, 1 % overlap bound).
        Their ``--num_reference 2`` draws 2 random points per pair: in random mode
        ``sampling_reference_point`` (main_dino.py) draws ``num_reference`` points; only grid
        mode uses k x k (the flag's help text, "Use k*k points in actual", is wrong).
        """
        return cls(
            num_global=2,
            num_local=4,
            global_size=224,
            local_size=224,
            global_scale=(0.25, 1.0),
            local_scale=(0.25, 1.0),
            num_teacher=2,
            num_points=2,
            point_mode="random",
        )

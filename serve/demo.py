"""Gradio app showing what a backbone attends to: per-head attention, masks, PCA, references.

:class:`Explorer` runs the model (resize, normalise, forward); :func:`build_demo` lays out the
Gradio Blocks around it. The pictures themselves come from :mod:`densedino.serve.visualize`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before gradio is imported: the demo must not phone home (closed networks, containers).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import torch
from PIL import Image

from densedino.cli.model_args import DEFAULT_RANDOM_ARCH
from densedino.data.eval_transform import normalize
from densedino.models.vit import VisionTransformer, arch_name, build_backbone
from densedino.weights import load_backbone

from . import visualize as vis

DEFAULT_THRESHOLD = 0.6
DISPLAY_SIZE = 448  # px, longer side of the painted maps (whatever the model's input size)
THUMB_SIZE = 224  # px, longer side of one head's tile
MAX_COLUMNS = 6  # heads per row of a tiled figure
# Real photos shipped inside scikit-image's wheel (no download): name -> skimage.data function.
EXAMPLES = ("astronaut", "chelsea", "coffee")
# System fonts only: the default theme pulls Google Fonts, which a closed network cannot reach.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)


@dataclass(frozen=True)
class Analysis:
    """One analysed image: what the click handler and the threshold slider need again."""

    image: np.ndarray  # the model's input, uint8 RGB [H, W, 3] (multiples of the patch size)
    display: np.ndarray  # the picture at display size (longer side DISPLAY_SIZE), uint8 RGB
    source_size: tuple[int, int]  # (height, width) of the picture the user clicks on
    cls_maps: np.ndarray  # last-block CLS attention over the patches, [heads, h, w]


def fit_size(height: int, width: int, longer: int, multiple: int = 1) -> tuple[int, int]:
    """(height, width) scaled so that the longer side is ~``longer``, both multiples of
    ``multiple`` (at least one), the aspect ratio kept as well as the rounding allows."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = longer / max(height, width)
    return (
        max(multiple, round(height * scale / multiple) * multiple),
        max(multiple, round(width * scale / multiple) * multiple),
    )


def as_rgb(picture: np.ndarray) -> np.ndarray:
    """An uploaded picture as uint8 RGB [H, W, 3] (grey is repeated, alpha dropped)."""
    picture = np.asarray(picture)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    if picture.ndim != 3 or picture.shape[-1] not in (3, 4) or min(picture.shape[:2]) < 1:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {picture.shape}")
    return np.ascontiguousarray(picture[..., :3], dtype=np.uint8)


class Explorer:
    """Runs a backbone on single images and returns the maps the demo paints."""

    def __init__(
        self, model: VisionTransformer, image_size: int = 448, device: str | torch.device = "cpu"
    ) -> None:
        if image_size < model.patch_size:
            raise ValueError(f"image_size {image_size} is below the patch size {model.patch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.patch = model.patch_size

    def prepare(self, picture: np.ndarray) -> np.ndarray:
        """The picture resized to the model's input size, uint8 RGB."""
        picture = as_rgb(picture)
        size = fit_size(*picture.shape[:2], self.image_size, self.patch)
        return vis.resize(picture, size)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        return normalize(x.permute(2, 0, 1)[None])

    def grid(self, image: np.ndarray) -> tuple[int, int]:
        """Patch grid (h, w) of a prepared image."""
        return image.shape[0] // self.patch, image.shape[1] // self.patch

    @torch.inference_mode()
    def analyse(self, picture: np.ndarray) -> tuple[Analysis, np.ndarray]:
        """CLS attention maps and the patch features [h, w, D] of a picture."""
        picture = as_rgb(picture)
        image = self.prepare(picture)
        x = self._tensor(image)
        attn = self.model.get_last_selfattention(x)[0]
        patches = self.model.forward_features(x)["patch"][0]
        height, width = picture.shape[:2]
        analysis = Analysis(
            image=image,
            display=vis.resize(picture, fit_size(height, width, DISPLAY_SIZE)),
            source_size=(height, width),
            cls_maps=vis.cls_attention(attn, self.grid(image)),
        )
        return analysis, vis.as_float(patches)

    @torch.inference_mode()
    def reference(
        self, image: np.ndarray, point: tuple[float, float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """For a reference token at ``point`` (x, y in [-1, 1]) of a prepared image: its
        attention over the patches per head [heads, h, w] and the cosine similarity of its
        output with every patch output [h, w]."""
        x = self._tensor(image)
        ref_points = torch.tensor([[point]], dtype=torch.float32, device=self.device)
        attn = self.model.get_last_selfattention(x, ref_points)[0]
        features = self.model.forward_features(x, ref_points)
        grid = self.grid(image)
        similarity = vis.cosine_similarity_map(features["ref"][0, 0], features["patch"][0])
        return vis.reference_attention(attn, grid), similarity


# ------------------------------------------------------------------------------ the model
def load_model(
    checkpoint: str | os.PathLike[str] | None,
    arch: str | None = None,
    patch_size: int = 16,
    *,
    which: str = "teacher",
) -> tuple[VisionTransformer, str]:
    """The backbone to show and a Markdown line saying which weights it has.

    Without a checkpoint: ``arch`` (default vit_small) with random weights (seed 0), labelled as
    such. With one, ``arch`` None is inferred from the weights (a given one is checked) and
    ``which`` picks the teacher or the student of a training checkpoint.
    """
    if checkpoint is None:
        with torch.random.fork_rng(devices=[]):  # the seed must not leak into the caller's RNG
            torch.manual_seed(0)
            model = build_backbone(arch or DEFAULT_RANDOM_ARCH, patch_size)
        return model.eval(), random_weights_label(model)
    model = load_backbone(checkpoint, arch, which=which)
    name = arch_name(model) or f"ViT (dim {model.embed_dim}, {model.num_heads} heads)"
    return model, (
        f"**Weights:** `{Path(checkpoint).name}`: {name}/{model.patch_size}, "
        f"depth {model.depth}, trained at {model.img_size} px."
    )


def random_weights_label(model: VisionTransformer) -> str:
    """The banner for a model without a checkpoint."""
    name = arch_name(model) or f"ViT (dim {model.embed_dim})"
    return (
        f"**⚠ RANDOM WEIGHTS — no checkpoint loaded.** This is an untrained "
        f"{name}/{model.patch_size} (depth {model.depth}): the maps show the mechanics of the "
        "demo, not learned features. Start it with `--checkpoint backbone.safetensors` to see "
        "a trained model."
    )


def bundled_examples(folder: str | os.PathLike[str] | None = None) -> list[str]:
    """Write scikit-image's sample photos as JPEG files (once) and return their paths.

    The default folder is ``$DENSEDINO_CACHE/demo-examples`` (``~/.cache/densedino``, as for
    scripts/install.sh). Gradio copies example files into its own cache when the app is built.
    """
    try:
        import skimage.data
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the demo's example photos come from scikit-image: pip install 'densedino[serve]'"
        ) from err
    cache = os.environ.get("DENSEDINO_CACHE") or Path.home() / ".cache" / "densedino"
    root = Path(folder or Path(cache) / "demo-examples")
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in EXAMPLES:
        path = root / f"{name}.jpg"
        if not path.is_file():
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=92)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------ the layout
def head_figure(analysis: Analysis) -> np.ndarray:
    """CLS attention of every head, painted and tiled side by side."""
    size = fit_size(*analysis.display.shape[:2], THUMB_SIZE)
    tiles = [
        vis.caption(vis.colorize(m, size), f"head {h}") for h, m in enumerate(analysis.cls_maps)
    ]
    return vis.tile(tiles, MAX_COLUMNS)


def mask_figure(analysis: Analysis, threshold: float) -> np.ndarray:
    """Every head's mass-threshold mask over the picture, tiled side by side."""
    thumb = vis.resize(analysis.display, fit_size(*analysis.display.shape[:2], THUMB_SIZE))
    masks = vis.mass_threshold_masks(analysis.cls_maps, threshold)
    tiles = [
        vis.caption(vis.overlay_mask(thumb, m), f"head {h}: {int(m.sum())}/{m.size}")
        for h, m in enumerate(masks)
    ]
    return vis.tile(tiles, MAX_COLUMNS)


def reference_figures(
    explorer: Explorer, analysis: Analysis, col: int, row: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Attention and similarity pictures of a reference token at source pixel (col, row)."""
    height, width = analysis.source_size
    point = vis.click_to_ref_point(col, row, width, height)
    attention, similarity = explorer.reference(analysis.image, point)
    size = analysis.display.shape[:2]
    heat = vis.blend(analysis.display, vis.colorize(attention.mean(axis=0), size))
    sim = vis.colorize(similarity, size, cmap="coolwarm")
    patch = vis.ref_point_to_patch(point, explorer.grid(analysis.image))
    info = (
        f"Reference token at pixel ({col}, {row}) = point ({point[0]:+.3f}, {point[1]:+.3f}), "
        f"patch (row {patch[0]}, column {patch[1]}); cosine similarity from "
        f"{similarity.min():+.2f} (blue) to {similarity.max():+.2f} (red)."
    )
    return vis.draw_marker(heat, point), vis.draw_marker(sim, point), info


CLICK_HINT = "Click the image to place a reference token there."


def build_demo(
    explorer: Explorer, weights_label: str, examples: list[str] | None = None
) -> gr.Blocks:
    """The Gradio Blocks app (not launched). ``examples``: image paths offered under the input."""
    with gr.Blocks(title="densedino attention demo") as demo:
        gr.Markdown(
            "# densedino: attention and dense features\n"
            "Last-block attention of the CLS token per head, DINO's mass-threshold masks, a PCA "
            "of the patch features and, for a clicked point, a DenseDINO reference token placed "
            "there: its attention over the patches and the cosine similarity of its output "
            "with every patch output."
        )
        gr.Markdown(weights_label, elem_id="weights-label")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                picture = gr.Image(
                    label="Image (click to place a reference token)",
                    type="numpy",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    elem_id="input-image",
                )
                threshold = gr.Slider(
                    0.05,
                    1.0,
                    value=DEFAULT_THRESHOLD,
                    step=0.05,
                    label="Mask threshold: fraction of the attention mass kept",
                    elem_id="threshold",
                )
                if examples:
                    gr.Examples(
                        examples,
                        inputs=picture,
                        label="Example photos (scikit-image)",
                        elem_id="examples",
                    )
            with gr.Column(scale=2):
                heads = _output("CLS attention per head (last block)", "attention-grid", 260)
                masks = _output("Mass-threshold masks per head (kept patches)", "mask-grid", 260)
        with gr.Row():
            pca = _output("PCA of patch features (RGB = PC 1-3)", "pca", 340)
            ref_attention = _output(
                "Reference token: attention (mean of heads)", "ref-attention", 340
            )
            ref_similarity = _output("Reference token: cosine similarity", "ref-similarity", 340)
        ref_info = gr.Markdown(CLICK_HINT, elem_id="ref-info")

        def on_image(picture: np.ndarray | None, threshold: float) -> tuple[Any, ...]:
            if picture is None:
                return None, None, None, None, None, None, CLICK_HINT
            analysis, patches = explorer.analyse(picture)
            pca_image = vis.resize(
                vis.to_uint8(vis.pca_rgb(patches)), analysis.display.shape[:2], nearest=True
            )
            figures = (head_figure(analysis), mask_figure(analysis, threshold), pca_image)
            return analysis, *figures, None, None, CLICK_HINT

        def on_threshold(analysis: Analysis | None, threshold: float) -> np.ndarray | None:
            return None if analysis is None else mask_figure(analysis, threshold)

        def on_click(analysis: Analysis | None, evt: gr.SelectData) -> tuple[Any, ...]:
            if analysis is None:
                return None, None, "Upload or pick an image first."
            return reference_figures(explorer, analysis, int(evt.index[0]), int(evt.index[1]))

        outputs = [state, heads, masks, pca, ref_attention, ref_similarity, ref_info]
        picture.change(on_image, [picture, threshold], outputs)
        threshold.release(on_threshold, [state, threshold], masks)
        picture.select(on_click, [state], [ref_attention, ref_similarity, ref_info])
    return demo


def _output(label: str, elem_id: str, height: int) -> gr.Image:
    return gr.Image(label=label, format="png", interactive=False, height=height, elem_id=elem_id)


def launch(demo: gr.Blocks, host: str, port: int, **kwargs: Any) -> None:
    """Serve the app (blocking unless ``prevent_thread_lock=True`` is passed)."""
    demo.launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        ssr_mode=False,  # server-side rendering needs Node; the plain app needs nothing
        show_error=True,
        **kwargs,
    )

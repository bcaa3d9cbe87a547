"""Drawing, from arrays and tables only: slides with their label masks, tile grids, heatmaps over thumbnails,
training curves.

Every figure of the report is drawn with these, so it has one look: one colour per class across the whole
report (benign green, Gleason 3 yellow, 4 orange, 5 red, Karolinska cancer purple), so a reader learns the legend
once. Nothing here opens a file or a slide (the import contract in ``pyproject.toml`` keeps it so): the chapters'
figures that read data first are in :mod:`bonylib.compose.figures`, those of a stage's own outputs beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from bonylib.files import atomic_path

CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "background": (255, 255, 255),
    "stroma": (120, 190, 255),
    "benign": (60, 170, 75),
    "G3": (240, 200, 30),
    "G4": (245, 120, 20),
    "G5": (200, 20, 30),
    "cancer": (140, 60, 170),
    "artefact": (40, 40, 40),
}
RADBOUD_NAMES = {0: "background", 1: "stroma", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}
KAROLINSKA_NAMES = {0: "background", 1: "benign", 2: "cancer"}
GLEASON_NAMES = {0: "background", 3: "G3", 4: "G4", 5: "G5"}
DEEPGLEASON_NAMES = {0: "background", 1: "artefact", 2: "benign", 3: "G3", 4: "G4", 5: "G5"}


def overlay(rgb: np.ndarray, labels: np.ndarray, names: dict[int, str], alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over ``rgb`` wherever the label is not background."""
    out = rgb.astype(np.float32).copy()
    for code, name in names.items():
        if name == "background":
            continue
        hit = labels == code
        out[hit] = (1 - alpha) * out[hit] + alpha * np.asarray(CLASS_COLOURS[name], np.float32)
    return out.astype(np.uint8)


def legend(ax: plt.Axes, names: Sequence[str]) -> None:
    """A legend of class colours on ``ax``."""
    handles = [Patch(color=np.asarray(CLASS_COLOURS[n]) / 255, label=n) for n in names if n != "background"]
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], ncols: int = 6, size: float = 2.0) -> Figure:
    """Images in a grid with a title each."""
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, image, title in zip(axes.ravel(), images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


REASON_COLOURS: dict[str, str] = {
    "": "#2ca02c", "background": "#7f7f7f", "pen": "#1f77b4", "blur": "#9467bd", "edges": "#ff7f0e", "homogeneity": "#d62728",
}


def tiles_on_slide(image: np.ndarray, downsample: float, tiles: pd.DataFrame, read_downsample: float, title: str) -> Figure:
    """A slide image (a level of downsample ``downsample``) with every measured tile outlined: kept in green,
    dropped in the colour of its reason; tiles were read at a level of downsample ``read_downsample``."""
    fig, ax = plt.subplots(figsize=(10, 10 * image.shape[0] / image.shape[1] + 0.5))
    ax.imshow(image)
    for row in tiles.itertuples():
        side = row.size * read_downsample / downsample
        ax.add_patch(Rectangle((row.x / downsample, row.y / downsample), side, side, fill=False, lw=0.8,
                               edgecolor=REASON_COLOURS.get(row.reason, "black")))
    counts = tiles.reason.replace("", "kept").value_counts()
    handles = [Patch(edgecolor=REASON_COLOURS.get("" if r == "kept" else r, "black"), fill=False, label=f"{r} ({n})")
               for r, n in counts.items()]
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    return fig


def slides_with_masks(images: Sequence[np.ndarray], overlays: Sequence[np.ndarray], titles: Sequence[tuple[str, str]],
                      legends: Sequence[Sequence[str]]) -> Figure:
    """Slides in rows, each beside its mask drawn over it (:func:`overlay`), with a legend of the mask's classes."""
    fig, axes = plt.subplots(len(images), 2, figsize=(12, 2.6 * len(images)), squeeze=False)
    for image, masked, (title, mask_title), names, (ax_img, ax_mask) in zip(images, overlays, titles, legends, axes,
                                                                          strict=True):
        ax_img.imshow(image)
        ax_img.set_title(title, fontsize=9)
        ax_mask.imshow(masked)
        ax_mask.set_title(mask_title, fontsize=9)
        legend(ax_mask, list(names))
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def value_examples(images: Sequence[np.ndarray], values: Sequence[float], reasons: Sequence[str], measure: str) -> Figure:
    """Tiles in a row with the value of one quality measure each, and the reason when the measure dropped it."""
    titles = [f"{measure}={v:.3g}" + ("" if r == "" else f"\n(dropped: {r})") for v, r in zip(values, reasons)]
    return image_grid(images, titles, ncols=len(images), size=1.9)


def haar_bands(rgb: np.ndarray, approx: np.ndarray, details: Sequence[np.ndarray]) -> Figure:
    """A tile and its one-level Haar bands as the wavelet stem computes them (:func:`bonylib.models.stems.haar_dwt2`):
    the approximation ``approx`` (h/2, w/2, 3; the 2x2 block sum) shown halved, and the three detail bands
    ``details`` (h/2, w/2, 3 each) as their magnitude averaged over RGB, each on its own scale (the details are
    small next to the approximation)."""
    panels = [rgb, np.clip(approx / 2, 0, 1), *(np.abs(band).mean(axis=-1) for band in details)]
    titles = ["tile", "cA: approximation / 2", "|cH|: horizontal detail", "|cV|: vertical detail",
              "|cD|: diagonal detail"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.2))
    for ax, panel, title in zip(axes, panels, titles):
        ax.imshow(panel, cmap="magma" if panel.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, dest: Path, dpi: int = 150) -> Path:
    """Write ``fig`` as an image atomically (a killed run leaves no half-written PNG) and close it."""
    with atomic_path(Path(dest)) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(dest)


def heat_colours(values: np.ndarray, cmap: str = "inferno", vmin: float | None = None,
                 vmax: float | None = None) -> np.ndarray:
    """RGBA floats (..., 4) of a 2-D map through ``cmap``, scaled to [vmin, vmax] (default: the map's own range);
    NaN (no tile there) is fully transparent."""
    low = float(np.nanmin(values)) if vmin is None else vmin
    high = float(np.nanmax(values)) if vmax is None else vmax
    scaled = (np.asarray(values, np.float64) - low) / (high - low if high > low else 1.0)
    return plt.colormaps[cmap](np.clip(scaled, 0.0, 1.0))


def attention_overlay(rgb: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None, alpha: float = 0.6,
                      cmap: str = "inferno") -> np.ndarray:
    """``heat`` (h, w, the size of ``rgb``) coloured over ``rgb`` (uint8); pixels outside ``mask`` (DINO's top
    attention mass) are shown darkened and uncoloured, so the kept regions stand out as in DINO's figures."""
    colours = heat_colours(heat, cmap)
    weight = alpha * colours[..., 3:]
    out = (1 - weight) * rgb.astype(np.float64) + weight * 255 * colours[..., :3]
    if mask is not None:
        out = np.where(mask[..., None], out, 0.35 * rgb)
    return out.round().astype(np.uint8)


def class_colours(fractions: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Colours in [0, 1] (h, w, 3) of per-pixel class fractions (h, w, classes) in the report's class colours,
    mixed where tiles of several classes overlap; NaN where there is no tile."""
    table = np.array([CLASS_COLOURS[name] for name in names], np.float64) / 255
    return fractions @ table


def slide_heatmap(thumbnail: np.ndarray, heat: np.ndarray, title: str, cmap: str = "inferno", alpha: float = 0.7,
                  label: str = "", names: Sequence[str] = ()) -> Figure:
    """A slide thumbnail with a stitched heatmap over it (NaN where no tile, so the slide shows through).

    ``heat`` is (h, w, 1), drawn through ``cmap`` with a colour bar named ``label``, or (h, w, 3) colours in
    [0, 1] (PCA components, :func:`class_colours`), with a legend of the classes ``names`` when given.
    """
    fig, ax = plt.subplots(figsize=(10, 10 * thumbnail.shape[0] / thumbnail.shape[1] + 0.6))
    draw_heat(ax, thumbnail, heat, title, cmap, alpha, label, names)
    fig.tight_layout()
    return fig


def draw_heat(ax: plt.Axes, thumbnail: np.ndarray, heat: np.ndarray, title: str, cmap: str = "inferno",
              alpha: float = 0.7, label: str = "", names: Sequence[str] = ()) -> None:
    """:func:`slide_heatmap` on the axes ``ax`` of a larger figure (slides side by side)."""
    ax.imshow(thumbnail)
    if heat.shape[-1] == 1:
        # the colour range spans the 1st to 99th percentile: a few peaked tiles would otherwise darken all the rest
        low, high = np.nanpercentile(heat, [1, 99]) if np.isfinite(heat).any() else (0.0, 1.0)
        shown = ax.imshow(np.ma.masked_invalid(heat[..., 0]), cmap=cmap, alpha=alpha, interpolation="nearest",
                          vmin=low, vmax=max(high, low + 1e-12))
        ax.figure.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label=label, extend="both")
    else:
        rgba = np.concatenate([np.nan_to_num(heat), alpha * ~np.isnan(heat[..., :1])], axis=-1)
        ax.imshow(np.clip(rgba, 0.0, 1.0), interpolation="nearest")
    if names:
        legend(ax, names)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def training_comparison(logs: dict[str, tuple[pd.DataFrame, pd.DataFrame]]) -> Figure:
    """Pretraining runs side by side (or one run), from their logs (:func:`bonylib.ssl.runs.training_log`): the
    loss with ln K dashed, the teacher's per-image entropy, the spread of its normalised outputs (near 0: every
    image gets the same output), images/s, and the k-NN balanced accuracy at each epoch end (both tasks, when the
    runs had a monitor)."""
    if not logs:
        raise ValueError("training_comparison: no runs to compare")
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    for i, (label, (steps, knn)) in enumerate(logs.items()):
        colour = f"C{i}"
        axes[0].plot(steps["step"], steps["loss"], color=colour, label=label)
        axes[1].plot(steps["step"], steps["teacher_entropy"], color=colour)
        axes[2].plot(steps["step"], steps["feature_std"], color=colour)
        axes[3].plot(steps["step"], steps["images_per_s"], color=colour)
        if not knn.empty:
            axes[4].plot(knn["step"], knn["knn_balanced_accuracy"], "o-", color=colour)
            if "knn_balanced_accuracy_cancer" in knn:
                axes[4].plot(knn["step"], knn["knn_balanced_accuracy_cancer"], "s--", color=colour)
    steps = next(iter(logs.values()))[0]
    for ax in axes[:2]:
        ax.axhline(steps["collapse_entropy"].iloc[0], color="grey", ls="--", lw=0.8)
    titles = ["loss (dashed: ln K)", "teacher entropy per image", "std of normalised teacher outputs", "images / s",
              "k-NN balanced accuracy (o: grades, s: cancer)"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def step_panels(steps: pd.DataFrame, columns: Sequence[str]) -> Figure:
    """One panel per log column against the step (the schedules of a run: lr, wd, momentum, teacher temperature)."""
    fig, axes = plt.subplots(1, len(columns), figsize=(3.75 * len(columns), 3), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ax.plot(steps["step"], steps[column])
        ax.set_title(column)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def growth_curves(table: pd.DataFrame, exponents: pd.DataFrame, labels: dict[str, str], quantities: dict[str, str],
                  patch: int = 16) -> Figure:
    """Measured cost against tokens on log-log axes (:mod:`bonylib.models.attention_cost`): one panel per quantity
    (column of ``table``, axis label in ``quantities``), one line per ``mechanism`` (named by ``labels``), with the
    fitted power law (``exponents``: mechanism, quantity, exponent, prefactor, min_tokens) dashed over the range
    it was fitted on and its exponent in the legend; the top axis gives the tile side at ``patch`` px per token."""
    fig, axes = plt.subplots(1, len(quantities), figsize=(5.5 * len(quantities), 4.2), layout="constrained")
    for ax, (quantity, label) in zip(axes, quantities.items()):
        for i, (mechanism, group) in enumerate(table.groupby("mechanism", sort=False)):
            colour = f"C{i}"
            fit = exponents[(exponents["mechanism"] == mechanism) & (exponents["quantity"] == quantity)].iloc[0]
            ax.plot(group["tokens"], group[quantity], "o-", color=colour,
                    label=f"{labels.get(mechanism, mechanism)}: $\\propto N^{{{fit['exponent']:.2f}}}$")
            fitted = group["tokens"][group["tokens"] >= fit["min_tokens"]].to_numpy(dtype=float)
            ax.plot(fitted, fit["prefactor"] * fitted ** fit["exponent"], "--", color=colour, alpha=0.6)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=label)
        top = ax.secondary_xaxis("top", functions=(lambda n: patch * np.sqrt(n), lambda s: (s / patch) ** 2))
        top.set_xlabel(f"tile side (px, patch {patch})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def learning_curves(runs: dict[str, list[tuple[pd.DataFrame, int]]], title: str) -> Figure:
    """Training loss and the validation score a head was early-stopped on, per step, one colour per row label and a
    line per run; each run's kept step dotted. ``runs``: per label, each run's curve (``step``, ``train_loss`` and
    the score's column) and its best step."""
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 3.4))
    for colour, (label, group) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], runs.items()):
        for i, (curve, best_step) in enumerate(group):
            score = next(c for c in curve.columns if c not in ("step", "train_loss"))
            loss_ax.plot(curve.step, curve.train_loss, color=colour, alpha=0.6, label=label if i == 0 else None)
            val_ax.plot(curve.step, curve[score], color=colour, alpha=0.6)
            val_ax.axvline(best_step, color=colour, lw=0.6, ls=":")
            val_ax.set_ylabel(f"validation {score.replace('_', ' ')}")
    loss_ax.set_ylabel("training loss")
    for ax in (loss_ax, val_ax):
        ax.set_xlabel("step")
    loss_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_matrices(matrices: dict[str, tuple[np.ndarray, Sequence[str], int]]) -> Figure:
    """One panel per row label: its confusion matrix as shares of each true class (rows), its class names, and the
    number of runs it sums."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (label, (shares, classes, runs)) in zip(axes[0], matrices.items()):
        ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
        for (i, j), value in np.ndenumerate(shares):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value > 0.6 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=45, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_title(f"{label}\n({runs} runs)", fontsize=9)
    axes[0][0].set_ylabel("true")
    fig.tight_layout()
    return fig


def _show_decoded(ax: plt.Axes, image: np.ndarray) -> None:
    """An RGB reconstruction (3, h, w), a one-channel target in [0, 1] (1, h, w), or a class map (h, w)."""
    if image.ndim == 3 and image.shape[0] == 3:
        ax.imshow(np.clip(np.transpose(image, (1, 2, 0)), 0, 1))
    elif image.ndim == 3:
        ax.imshow(image[0], cmap="magma", vmin=0, vmax=1)
    else:
        ax.imshow(image, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def decoded_examples(targets: Sequence[np.ndarray], outputs: dict[str, Sequence[np.ndarray]],
                     classes: Sequence[str] = ()) -> Figure:
    """The targets in the top row and each row label's decoded outputs of the same examples below; class maps get a
    caption naming the classes' codes."""
    count = len(targets)
    fig, axes = plt.subplots(1 + len(outputs), count, figsize=(1.7 * count, 1.8 * (1 + len(outputs))), squeeze=False)
    for j, target in enumerate(targets):
        _show_decoded(axes[0][j], target)
    axes[0][0].set_ylabel("target", fontsize=8)
    for i, (label, images) in enumerate(outputs.items(), start=1):
        for j, image in enumerate(images):
            _show_decoded(axes[i][j], image)
        axes[i][0].set_ylabel(label, fontsize=8)
    if classes and targets[0].ndim == 2:
        fig.suptitle("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(classes)), fontsize=8)
    fig.tight_layout()
    return fig


def heats_side_by_side(thumbnail: np.ndarray, heats: Sequence[tuple[np.ndarray, str]], names: Sequence[str] = ()) -> Figure:
    """Several colour maps (h, w, 3) over one thumbnail, side by side, each with its title (:func:`draw_heat`)."""
    aspect = thumbnail.shape[0] / thumbnail.shape[1]
    fig, axes = plt.subplots(1, len(heats), figsize=(6.5 * len(heats), 6.5 * aspect + 0.8), squeeze=False)
    for ax, (colours, title) in zip(axes[0], heats):
        draw_heat(ax, thumbnail, colours, title, names=names)
    fig.tight_layout()
    return fig


def interval_dots(cells: pd.DataFrame, titles: dict[str, str], formats: dict[str, str],
                  shared_reasons: dict[str, str]) -> Figure:
    """Every row on every column: the mean as a dot and its interval as a whisker (solid: ``interval ==
    "bootstrap"``; dashed: another, e.g. the range over folds); a cell without an interval shows its dot hollow
    with its ``interval_note``, or, when a column's every such cell gives one reason (``shared_reasons``), the
    reason once under the title; a row with no mean says it was not evaluated.

    ``cells``: a row per (column, label) with ``mean``, ``ci_low``, ``ci_high``, ``interval``, ``interval_note``;
    ``titles`` and ``formats`` (format specs) per column."""
    columns = list(dict.fromkeys(cells["column"]))
    labels = list(dict.fromkeys(cells["label"]))
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 0.55 * len(labels) + 1.4), sharey=True,
                             squeeze=False)
    y = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    for ax, column in zip(axes[0], columns):
        part = cells[cells["column"] == column]
        shared, fmt = shared_reasons.get(column, ""), formats[column]
        finite = part[np.isfinite(part["mean"])]
        span = np.concatenate([finite["mean"], finite["ci_low"].dropna(), finite["ci_high"].dropna()])
        left = float(span.min()) if span.size else 0.0
        for _, cell in part.iterrows():
            row = y[cell["label"]]
            if not np.isfinite(cell["mean"]):
                ax.annotate("not evaluated", (left, row), fontsize=7, color="grey", va="center")
                continue
            if cell["interval"]:
                ax.plot([cell["ci_low"], cell["ci_high"]], [row, row], color="C0", lw=1.6,
                        ls="-" if cell["interval"] == "bootstrap" else "--")
                ax.plot(cell["mean"], row, "o", color="C0")
            else:
                ax.plot(cell["mean"], row, "o", mfc="white", color="C0")
                if not shared:
                    ax.annotate(f"no CI: {cell['interval_note']}", (cell["mean"], row), xytext=(0, -9),
                                textcoords="offset points", fontsize=6.5, color="grey", ha="center", va="top")
        ax.set_title(titles[column] + (f"\nno CI: {shared}" if shared else ""), fontsize=9)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda value, _, fmt=fmt: format(value, fmt)))
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15, y=0.12)
    axes[0][0].set_yticks(list(y.values()), list(y))
    fig.tight_layout()
    return fig


def token_colour_tiles(tiles: Sequence[np.ndarray], names: Sequence[str], rows: dict[str, np.ndarray]) -> Figure:
    """Tiles in the top row and under them one row per encoder of its patch tokens' colours ((tiles, grid, grid, 3) in
    [0, 1]: :func:`bonylib.attention.tokens.token_colours` of these tiles), each token drawn as a block (matplotlib
    upsamples a small image by nearest neighbour)."""
    panels, titles = list(tiles), [name[:14] for name in names]
    for label, colours in rows.items():
        if len(colours) != len(tiles):
            raise ValueError(f"token_colour_tiles: {label} has colours for {len(colours)} tiles, not {len(tiles)}")
        panels += list(colours)
        titles += [label] + [""] * (len(tiles) - 1)
    return image_grid(panels, titles, ncols=len(tiles), size=1.9)


def cluster_overview(counts: pd.DataFrame, examples: Sequence[Sequence[np.ndarray]]) -> Figure:
    """The clusters of a curated collection: left, the tiles of each cluster (rows of ``counts``) stacked by label
    (its columns, class colours where a column is a class), on a log scale so that small clusters show; right,
    ``examples[i]``, a few tiles of cluster i in a row."""
    clusters, per_row = len(counts), max(len(row) for row in examples)
    fig = plt.figure(figsize=(4.5 + 1.1 * per_row, 0.9 + 1.1 * clusters), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[4.5, 1.1 * per_row])
    ax = left.subplots()
    start = np.zeros(clusters)
    for label in counts.columns:
        colour = np.asarray(CLASS_COLOURS[label]) / 255 if label in CLASS_COLOURS else "lightgrey"
        ax.barh(np.arange(clusters), counts[label], left=start, color=colour, edgecolor="black", lw=0.3, label=label)
        start = start + counts[label].to_numpy()
    ax.set(yticks=np.arange(clusters), yticklabels=[f"cluster {c}" for c in counts.index], xscale="log",
           xlabel="tiles (log scale)", ylim=(clusters - 0.5, -0.5))
    ax.set_xlim(left=0.8)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("tiles per cluster, by label", fontsize=10)
    axes = right.subplots(clusters, per_row, squeeze=False)
    for row, tiles in zip(axes, examples):
        for ax, tile in zip(row, [*tiles, *[None] * (per_row - len(tiles))]):
            ax.set_axis_off()
            if tile is not None:
                ax.imshow(tile)
    right.suptitle("example tiles of each cluster", fontsize=10)
    return fig


def run_curves(logs: dict[str, pd.DataFrame], columns: dict[str, str]) -> Figure:
    """Several runs' logged values against the step, one panel per column (``columns``: column -> title), one colour
    per run; a run without a column (a term it does not train) has no line in that panel."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.3), squeeze=False)
    for i, (label, steps) in enumerate(logs.items()):
        for ax, column in zip(axes[0], columns):
            if column in steps and steps[column].notna().any():
                ax.plot(steps["step"], steps[column], color=f"C{i}", label=label)
    for ax, title in zip(axes[0], columns.values()):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def lines_against(frame: pd.DataFrame, x: str, series: str, panels: dict[str, str], xlabel: str,
                  reference: tuple[str, str] | None = None, log_x: bool = True) -> Figure:
    """One panel per column of ``panels`` (its axis label), that column against ``x`` with a line per value of
    ``series``; ``reference`` (a column, its legend) is drawn once, dashed black, in the first panel (a floor every
    line is read against)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), layout="constrained", squeeze=False)
    for i, (ax, (column, label)) in enumerate(zip(axes[0], panels.items())):
        for name, group in frame.groupby(series, sort=False):
            ax.plot(group[x], group[column], "o-", label=str(name))
        if reference is not None and i == 0:
            first = frame.drop_duplicates(x).sort_values(x)
            ax.plot(first[x], first[reference[0]], "k--", label=reference[1])
        ax.set(xlabel=xlabel, ylabel=label, xscale="log" if log_x else "linear")
        ticks = np.sort(frame[x].unique())
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return fig

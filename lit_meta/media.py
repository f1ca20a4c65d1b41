"""Pictures of what a meta-learner does, at every validation: to Weights & Biases, or as PNG files.

:class:`MediaCallback` (on by default in the CLI) takes the first task of the first validation batch and draws

* ``episode``: the support images with their labels and the query images with the predicted labels (green when
  right, red when wrong); for regression, the support points, the query targets and the adapted predictions;
* ``adaptation``: the query loss (and accuracy) after 0, 1, ..., ``eval_inner_steps`` inner steps, for the
  optimization-based methods (MAML, ANIL, Meta-SGD, Reptile);
* ``embeddings``: a 2-D PCA projection (``torch.pca_lowrank``) of the support and query embeddings and the class
  means, for the metric methods (ProtoNet, MatchingNet, Meta-BGD).

With an active :class:`~lightning.pytorch.loggers.WandbLogger` they are logged as ``wandb.Image`` under
``media/<name>``; otherwise (no W&B logger, or ``WANDB_MODE=disabled``) they are written as
``<log_dir>/media/<name>-epoch<E>-step<S>.png``. The figures are drawn on matplotlib's Agg canvas directly (no
``pyplot``, so a notebook's backend is left alone); matplotlib and wandb are imported only when a figure is made.
The figure functions are public, for notebooks: :func:`episode_figure`, :func:`adaptation_figure`,
:func:`embedding_figure`, :func:`regression_figure`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from datamodules.errors import ConfigError, LitMetaError
from datamodules.task_batch import TaskBatch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from lit_meta.algorithms.base import MetaLearner

__all__ = [
    "MediaCallback",
    "adaptation_curve",
    "adaptation_figure",
    "embedding_figure",
    "embedding_projection",
    "episode_figure",
    "figure_to_image",
    "regression_figure",
]


# ------------------------------------------------------------------------------------------------------ drawing
def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on its own Agg canvas (no pyplot state, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def figure_to_image(figure: Figure) -> Any:
    """The figure as an RGB ``PIL.Image`` (what ``wandb.Image`` takes)."""
    import numpy as np
    from PIL import Image

    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")


def _displayable(image: Tensor) -> tuple[Any, str | None]:
    """``[C, H, W]`` model input as an array for ``imshow`` (values outside ``[0, 1]`` are rescaled per image)."""
    image = image.detach().float().cpu()
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        image = (image - low) / max(high - low, 1e-8)
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image[:3].permute(1, 2, 0).clamp(0, 1).numpy(), None


def _label(index: int, class_names: Sequence[str] | None) -> str:
    return class_names[index] if class_names is not None and index < len(class_names) else str(index)


def episode_figure(
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor | None = None,
    predictions: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    max_query: int = 20,
    columns: int = 10,
) -> Figure:
    """One image-classification episode: support images with labels, query images with predictions.

    Args:
        support_x, support_y: ``[n, C, H, W]`` and ``[n]``.
        query_x: ``[m, C, H, W]``.
        query_y: true query labels (``None`` when unknown: predictions are then drawn in black).
        predictions: predicted query labels ``[m]`` (``None``: the true labels are shown).
        class_names: names for the labels.
        max_query: draw at most this many query images (spread over the set).
        columns: images per row.
    """
    n_support = len(support_x)
    if len(query_x) > max_query:
        keep = torch.linspace(0, len(query_x) - 1, max_query).round().long()
        query_x = query_x[keep]
        query_y = query_y[keep] if query_y is not None else None
        predictions = predictions[keep] if predictions is not None else None
    columns = max(1, min(columns, max(n_support, len(query_x))))
    support_rows, query_rows = math.ceil(n_support / columns), math.ceil(len(query_x) / columns)
    figure = new_figure(1.1 * columns, 1.3 * (support_rows + query_rows) + 0.4)
    support_fig, query_fig = figure.subfigures(2, 1, height_ratios=[support_rows, max(query_rows, 1)])
    support_fig.suptitle("support", fontsize=10)
    query_fig.suptitle("query: prediction (truth)" if query_y is not None and predictions is not None else "query", fontsize=10)
    for subfigure, images, rows in ((support_fig, support_x, support_rows), (query_fig, query_x, query_rows)):
        axes = subfigure.subplots(max(rows, 1), columns, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i >= len(images):
                continue
            array, cmap = _displayable(images[i])
            ax.imshow(array, cmap=cmap, vmin=0.0, vmax=1.0)
            if subfigure is support_fig:
                ax.set_title(_label(int(support_y[i]), class_names), fontsize=8)
            elif predictions is not None:
                pred = int(predictions[i])
                if query_y is None:
                    ax.set_title(_label(pred, class_names), fontsize=8)
                else:
                    truth = int(query_y[i])
                    ax.set_title(
                        f"{_label(pred, class_names)} ({_label(truth, class_names)})",
                        fontsize=8,
                        color="tab:green" if pred == truth else "tab:red",
                    )
            elif query_y is not None:
                ax.set_title(_label(int(query_y[i]), class_names), fontsize=8)
    return figure


def regression_figure(
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor | None,
    curves: dict[str, tuple[Tensor, Tensor]] | None = None,
    title: str = "",
) -> Figure:
    """A 1-D regression task: support points, query targets and predicted curves ``{label: (x, y)}``."""
    figure = new_figure(6.0, 4.0)
    ax = figure.subplots()
    for label, (x, y) in (curves or {}).items():
        x, y = x.detach().cpu().flatten(), y.detach().cpu().flatten()
        order = torch.argsort(x)
        ax.plot(x[order].numpy(), y[order].numpy(), label=label)
    if query_y is not None:
        ax.plot(query_x.cpu().flatten().numpy(), query_y.cpu().flatten().numpy(), ".", color="gray", label="query targets")
    ax.plot(support_x.cpu().flatten().numpy(), support_y.cpu().flatten().numpy(), "^", color="tab:purple", markersize=8, label="support points")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return figure


def adaptation_curve(model: MetaLearner, episode: TaskBatch, points: int = 11) -> dict[str, list[float]]:
    """Query loss (and accuracy or MSE) of one task after ``k`` inner steps, ``k`` from 0 to ``eval_inner_steps``.

    Each point re-runs the model's evaluation with ``steps=k`` (:meth:`MetaLearner.adapt`), which is right for every
    optimization-based method; ``points`` bounds the number of values of ``k`` (spread evenly) and so the cost.

    Returns:
        ``{"steps": [...], "loss": [...], "acc" or "mse": [...]}``.
    """
    from lit_meta.algorithms.base import task_loss, task_metric

    total = getattr(model, "eval_inner_steps", None)
    if total is None:
        raise ConfigError(f"{type(model).__name__} has no inner loop: there is no adaptation curve")
    count = max(2, min(points, total + 1))
    steps = sorted({round(i * total / (count - 1)) for i in range(count)})
    sx, sy, qx, qy = (t[0] for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y))
    metric = "acc" if episode.is_classification else "mse"
    curve: dict[str, list[float]] = {"steps": [], "loss": [], metric: []}
    for k in steps:
        out = model.adapt(sx, sy, steps=k).outputs(qx)
        curve["steps"].append(k)
        curve["loss"].append(float(task_loss(out, qy)))
        curve[metric].append(float(task_metric(out, qy)))
    return curve


def adaptation_figure(curve: dict[str, list[float]], title: str = "") -> Figure:
    """Plot :func:`adaptation_curve`: query loss (left axis) and accuracy (right axis) against inner steps."""
    figure = new_figure(5.0, 3.5)
    ax = figure.subplots()
    ax.plot(curve["steps"], curve["loss"], "o-", color="tab:blue", label="query loss")
    ax.set_xlabel("inner step")
    ax.set_ylabel("query loss", color="tab:blue")
    if "acc" in curve:
        twin = ax.twinx()
        twin.plot(curve["steps"], curve["acc"], "s--", color="tab:orange", label="query accuracy")
        twin.set_ylabel("query accuracy", color="tab:orange")
        twin.set_ylim(-0.02, 1.02)
    ax.set_title(title or "adaptation on one validation task")
    return figure


def embedding_projection(model: MetaLearner, episode: TaskBatch) -> dict[str, Tensor]:
    """2-D PCA of one task's support and query embeddings (a metric method's ``embed_task``).

    Returns:
        ``{"support": [n, 2], "query": [m, 2], "means": [N, 2]}``: the projected embeddings and class means of the
        support embeddings (ProtoNet's prototypes; the projection is linear, so the mean of the projections).
    """
    embed_task = getattr(model, "embed_task", None)
    if embed_task is None:
        raise ConfigError(f"{type(model).__name__} has no embeddings to project")
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    with torch.no_grad(), model.evaluation_normalization():
        zs, zq = embed_task(sx, qx, training=False)
    z = torch.cat([zs, zq]).flatten(1).float().cpu()
    centred = z - z.mean(dim=0, keepdim=True)
    q = min(2, *centred.shape)
    _, _, v = torch.pca_lowrank(centred, q=q, center=False)
    projected = centred @ v[:, :q]
    if q < 2:  # a degenerate episode: pad to 2-D so it can still be drawn
        projected = torch.cat([projected, torch.zeros(len(projected), 2 - q)], dim=1)
    support, query = projected[: len(zs)], projected[len(zs) :]
    labels = sy.cpu()
    means = torch.stack([support[labels == c].mean(dim=0) for c in range(int(labels.max()) + 1)])
    return {"support": support, "query": query, "means": means}


def embedding_figure(
    projection: dict[str, Tensor],
    support_y: Tensor,
    query_y: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Figure:
    """Plot :func:`embedding_projection`: support (triangles), query (dots), class means (stars), coloured by class."""
    from matplotlib import colormaps

    figure = new_figure(5.0, 4.5)
    ax = figure.subplots()
    ways = len(projection["means"])
    colors = colormaps["tab10" if ways <= 10 else "tab20"]
    support_y = support_y.cpu()
    for c in range(ways):
        color = colors(c % colors.N)
        s = projection["support"][support_y == c]
        ax.scatter(s[:, 0], s[:, 1], marker="^", s=50, color=color, edgecolors="black", linewidths=0.5, label=_label(c, class_names))
        if query_y is not None:
            q = projection["query"][query_y.cpu() == c]
            ax.scatter(q[:, 0], q[:, 1], marker="o", s=18, color=color, alpha=0.7)
        m = projection["means"][c]
        ax.scatter([m[0]], [m[1]], marker="*", s=220, color=color, edgecolors="black", linewidths=0.8)
    if query_y is None:
        ax.scatter(projection["query"][:, 0], projection["query"][:, 1], marker="o", s=18, color="gray", alpha=0.7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "embeddings (PCA): support ▲, query ●, class means ★", fontsize=10)
    if ways <= 10:
        ax.legend(fontsize=7, loc="best")
    return figure


def episode_figures(model: MetaLearner, episode: TaskBatch, curve_points: int = 11, max_query: int = 20) -> dict[str, Figure]:
    """Every figure that applies to ``model`` on ``episode`` (one task): ``{name: figure}``."""
    figures: dict[str, Figure] = {}
    sx, sy, qx, qy = (t[0] for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y))
    adapted = model.adapt(sx, sy)
    if episode.is_classification and sx.dim() == 4:
        figures["episode"] = episode_figure(sx, sy, qx, qy, adapted.predict(qx), max_query=max_query)
    elif not episode.is_classification and sx.dim() == 2 and sx.shape[-1] == 1:
        curves = {"after adaptation": (qx, adapted(qx))}
        figures["episode"] = regression_figure(sx, sy, qx, qy, curves, title="one validation task")
    if hasattr(model, "eval_inner_steps"):
        figures["adaptation"] = adaptation_figure(adaptation_curve(model, episode, curve_points))
    if hasattr(model, "embed_task") and episode.is_classification:
        figures["embeddings"] = embedding_figure(embedding_projection(model, episode), sy, qy)
    return figures


# ----------------------------------------------------------------------------------------------------- callback
def active_wandb_loggers(trainer: Any) -> list[Any]:
    """The trainer's W&B loggers that really log (not ``WANDB_MODE=disabled``), without starting a run."""
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - part of lightning
        return []
    if os.environ.get("WANDB_MODE", "").lower() == "disabled":
        return []
    return [
        logger
        for logger in trainer.loggers
        if isinstance(logger, WandbLogger) and str(getattr(logger, "_wandb_init", {}).get("mode") or "").lower() != "disabled"
    ]


class MediaCallback(Callback):
    """Draws one validation task at the end of every ``every_n_epochs``-th validation (see the module docstring).

    Args:
        every_n_epochs: draw at validations of epochs divisible by it.
        png: write PNG files: ``None`` (default) when no W&B logger is active, ``True`` always, ``False`` never.
        dirname: the PNGs go to ``<trainer.log_dir>/<dirname>/``.
        curve_points: at most this many points on the adaptation curve (each re-adapts the task).
        max_query: at most this many query images in the episode grid.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        png: bool | None = None,
        dirname: str = "media",
        curve_points: int = 11,
        max_query: int = 20,
    ) -> None:
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs <= 0:
            raise ConfigError(f"MediaCallback: every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        self.every_n_epochs = every_n_epochs
        self.png = png
        self.dirname = dirname
        self.curve_points = curve_points
        self.max_query = max_query
        self.written: list[Path] = []
        self._episode: TaskBatch | None = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._episode = None

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The batch is already on the device and prepared (float images), as the model saw it.
        if self._episode is None and isinstance(batch, TaskBatch):
            self._episode = batch.task(0)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        episode, self._episode = self._episode, None
        if episode is None or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        loggers = active_wandb_loggers(trainer)
        write_png = self.png if self.png is not None else not loggers
        # log_dir broadcasts: every rank must ask for it, before only rank 0 goes on.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname if write_png else None
        if not trainer.is_global_zero or not (loggers or write_png):
            return
        try:
            figures = episode_figures(pl_module, episode, self.curve_points, self.max_query)
        except LitMetaError:
            raise
        except Exception as err:  # a picture is never worth a crashed training run
            rank_zero_warn(f"MediaCallback: no figures this validation ({type(err).__name__}: {err})")
            return
        for name, figure in figures.items():
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{name}-epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}.png"
                figure.savefig(path)
                self.written.append(path)
            if loggers:
                image = figure_to_image(figure)
                for logger in loggers:
                    logger.log_image(key=f"media/{name}", images=[image], step=trainer.global_step)

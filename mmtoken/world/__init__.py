"""mmtoken's synthetic world: procedurally generated scenes with exact ground truth, the benchmark tasks
built on them, and the vocabulary of the tiny models trained on them."""

from .scenes import COLOURS, SHAPES, SIZES, CELLS, Obj, Scene, render, render_batch, render_seeds, sample_scene
from .tasks import TASKS, Sample, get_task

__all__ = ["COLOURS", "SHAPES", "SIZES", "CELLS", "Obj", "Scene", "render", "render_batch", "render_seeds", "sample_scene", "TASKS", "Sample", "get_task"]

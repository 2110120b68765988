"""A synthetic world of rendered scenes, and the recipe that trains mmgpt's default model on it."""

from models.scenes.language import TASKS
from models.scenes.sample import sample
from models.scenes.world import EVAL_SEED_START, TRAIN_SEED_END, Scene, SceneObject

__all__ = ["EVAL_SEED_START", "TASKS", "TRAIN_SEED_END", "Scene", "SceneObject", "sample"]

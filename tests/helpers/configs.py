"""Overrides shared by tests: a tiny synthetic data set and a few-step CPU run."""

from __future__ import annotations

# A few frames of synthetic OCT and a handful of steps: the whole train path in seconds.
FAST_DATA = [
    "data.synthetic.num_videos=4",
    "data.synthetic.frames_per_video=3",
    "data.synthetic.image_size=64",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.num_workers=0",
]


FAST_TRAIN = [
    *FAST_DATA,
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]

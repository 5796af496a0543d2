"""Baselines beside Sa2VA, each one class + one ``conf/model/<name>.yaml``, all implementing
:mod:`sa2va.model.protocol` (most through :class:`~sa2va.model.baselines.frame.FrameSegmenter`)."""

"""Device memory: the VRAM planner (a pure function from sizes and a budget to a plan), placement
(packed pinned host units, uploads, prefetches on a side stream, offloads), streaming a model
through a ring buffer, the tiled VAE decode and its memory estimates, and the stage meter.

Every write by the side stream goes through ``Placement.copy_async`` (see placement.py for the two
rules that keep freed memory safe from copies in flight)."""

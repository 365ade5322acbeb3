"""The rendering engine: a library a script, a test or any front end can drive; no UI imports here.

Layout (one responsibility per module; sub-packages import only downwards, and nothing from sdterm
outside the engine except the leaf modules ``config`` (architecture), ``params`` (the render
record), ``errors``, ``units`` and ``fsutil``):

- ``pipeline``: ``Engine.generate(params, emit=..., cancelled=...)``: text encoder -> U-Net -> VAE,
  each stage under the memory plan, retried with a cheaper plan on out-of-memory;
- ``events``: the typed events the engine emits (the UI renders them);
- ``embedding_cache``: the on-disk cache of text-encoder outputs;
- ``networks/``: U-Net, VAE decoder, CLIP text encoder, attention;
- ``loading/``: checkpoints, the model holder, the demo model;
- ``prompt/``: tokenizing and chunking prompts;
- ``sampling/``: samplers over a denoiser callable (a registry), guidance, the starting noise;
- ``memory/``: planner, placement, streaming, tiled VAE decode, stage meter.
"""

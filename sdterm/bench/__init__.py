"""``sdterm bench``: device memory and speed of sdterm's renders beside diffusers' pipeline, same weights.

One run measures, for each requested size x VRAM budget, sdterm's renders with the prompt cached and
the models already in host memory (one warm-up render first, then ``--repeats`` timed ones), and then,
when diffusers is installed, diffusers' ``StableDiffusionPipeline`` built on the very same weights
(all on the GPU, model CPU offload, sequential CPU offload). It prints one table, or with ``--json``
one JSON object with raw bytes and seconds.

Like the rest of the command line this is a front end: it drives the engine and prints; the engine
itself never prints. sdterm runs first, so diffusers' allocations can't reach sdterm's figures; each
reference pipeline is freed (and the allocator emptied, peaks reset) before the next one is built.

The modules, each importing only those above it:

* ``options.py``: what to measure (``BenchOptions``: sizes, budgets, steps, reference modes) and
  the parsing of the flags into it;
* ``rows.py``: what was measured (a ``Row`` per size x budget or mode, the ``BenchReport``), the
  ratios to diffusers all on the GPU;
* ``device.py``: synchronising and emptying the device between measurements, and the errors that
  end one row rather than the run;
* ``reference.py``: diffusers' pipeline built on the engine's weights, placed and timed;
* ``run.py``: sdterm's rows, then the reference's (``run_bench``);
* ``report.py``: the table;
* ``command.py``: ``sdterm bench``'s flags (``add_parser``) and ``run``.

torch, the engine and diffusers are imported inside the functions that use them, so
``sdterm bench --help`` stays fast.
"""

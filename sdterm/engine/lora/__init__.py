"""LoRA: low-rank weight deltas from a file, folded into a model's weights (AUTOMATIC1111's
``<lora:NAME:W>``).

- ``files.py``: reading a LoRA file safely (safetensors; ``.pt``/``.ckpt`` only through the
  restricted unpickler) in kohya-ss's layout (diffusers-style or LDM-style module names, LoCon
  convolutions, LyCORIS Tucker ``lora_mid``) or diffusers/PEFT's, mapped onto sdterm's own
  module names; A1111's short hash.
- ``merge.py``: the delta of each layer and the merge into the model's (packed) weights, undone
  and redone only where the set of LoRAs or their weights changed.
- ``folders.py``: where LoRA files are found by name, each file read once while it is unchanged.
"""

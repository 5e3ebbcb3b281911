"""The tensor operations the model and the training loss are made of, in plain PyTorch, with yunque's
CPU speed-ups (yunque/cpu/) tried first where they run.

- `attention.py`: `attention` (RoPE, cache write, and the fastest way to attend), `Segments` of packed rows;
- `functional.py`: RMSNorm and SwiGLU that save only their inputs, the head's cross-entropy per chunk;
- `recompute.py`: activations and weight copies kept for backward as the recipe that made them;
- `seam.py`: the one way into yunque/cpu/, and its memory tuning and decode layout.

Nothing else in yunque imports yunque.cpu: without that package every op here runs in PyTorch.
"""

from yunque.ops.attention import Segments, apply_rope, attention, decode_attention, segment_attention
from yunque.ops.functional import cross_entropy_, rms_norm, swiglu
from yunque.ops.recompute import params_recast_in_backward, saved_as_recipe
from yunque.ops.seam import arrange_for_decode_, release_cpu_memory, tune_cpu_memory

__all__ = [
    "Segments",
    "apply_rope",
    "arrange_for_decode_",
    "attention",
    "cross_entropy_",
    "decode_attention",
    "params_recast_in_backward",
    "release_cpu_memory",
    "rms_norm",
    "saved_as_recipe",
    "segment_attention",
    "swiglu",
    "tune_cpu_memory",
]

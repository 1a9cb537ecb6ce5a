"""Remedy: fixes tried on the model at run time, their effect, their side effect, and notes.

For a confirmed cause set the fixes are (one module per kind, each a ``Fix`` registered in
``FIX_KINDS`` by its ``kind``):

- ``mean_ablation``: every component of the set held at its mean over the reference prompts;
- ``mean_ablation_top``: only the top-ranked cause held at its mean;
- ``targeted_ablation``: the set's heads, and of its MLPs only the neurons that push hardest
  toward the bad continuation (by attribution), the fewest of 2, 4, 8, 16 or 32 that bring
  P(bad) under the target, held at their means: the smallest change that works
  (these three: ``rca.remedy.ablation``);
- ``direction_removal``: the contrastive direction, the difference of mean residual streams
  between the prompt and the counterfactual after a causal layer (each layer of the set is
  tried), projected out of every write into the residual stream up to that layer, at every
  position, so that the residual stream there carries none of it
  (``rca.remedy.direction_removal``);
- ``write_direction_removal``: narrower, per component of the set: the difference between what
  the component writes at the answer position on the prompt and on the counterfactual is
  projected out of that component's writes only (its slice of the output projection for a
  head, its down projection for an MLP). Everything else the component writes, and every other
  component, is untouched, which is why it usually costs the least
  (``rca.remedy.write_direction_removal``);
- ``weight_edit``: deltas to the set's write weights trained against P(bad), KL-bounded on
  benign text (``rca.remedy.edit``).

``rca.remedy.search`` tries them all and recommends one (``try_remedies``, ``recommend``);
``rca.remedy.patch`` bakes a fix's patch spec (JSON) into the weights of a model directory, so
the fixed model can ship without rca's hooks (``apply_patch``). ``rca.remedy.fix`` holds the
interface and the registry.
"""

from rca.remedy.ablation import MeanAblation, MeanAblationTop, TargetedAblation
from rca.remedy.direction_removal import DirectionRemoval
from rca.remedy.edit import (
    EDIT_BYTES,
    EDIT_CHUNK_BYTES,
    WeightEdit,
    weight_edit,
    weight_edit_prompts,
)
from rca.remedy.fix import (
    FIX_KINDS,
    PATCH_FORMAT,
    Fix,
    RemedyError,
    first_layer,
    fix_context,
    fix_from_spec,
    pack,
    unpack,
)
from rca.remedy.patch import MAX_SPEC_BYTES, apply_patch, bake, load_spec
from rca.remedy.search import (
    HOLD_SHARE,
    Remedy,
    VariantTarget,
    benign_side_effect,
    recommend,
    try_remedies,
)
from rca.remedy.write_direction_removal import WriteDirectionRemoval

__all__ = [
    "DirectionRemoval",
    "EDIT_BYTES",
    "EDIT_CHUNK_BYTES",
    "FIX_KINDS",
    "Fix",
    "HOLD_SHARE",
    "MAX_SPEC_BYTES",
    "MeanAblation",
    "MeanAblationTop",
    "PATCH_FORMAT",
    "Remedy",
    "RemedyError",
    "TargetedAblation",
    "VariantTarget",
    "WeightEdit",
    "WriteDirectionRemoval",
    "apply_patch",
    "bake",
    "benign_side_effect",
    "first_layer",
    "fix_context",
    "fix_from_spec",
    "load_spec",
    "pack",
    "recommend",
    "try_remedies",
    "unpack",
    "weight_edit",
    "weight_edit_prompts",
]

"""What a model's parameters are, told by the modules that hold them, never by their names.

Two users: weight decay (`msit.training.trainer.make_optimizer`) goes by each parameter's kind, and fine-tuning
(`msit.training.finetune`) by the parts each family declares (`head_parts`, `scene_parts`).

Kinds: "matmul" (a weight that multiplies its input: decayed when of rank >= 2), "table" (rows looked
up by an id or a scene), "bias" (added) and "norm" (a normalisation's scale or shift). torch's own
layers are known by type; a module that holds an `nn.Parameter` of its own declares what it is in a
`parameter_kinds` class attribute, and one that does not is an error, not a guess.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from msit.errors import MsitError

KINDS = ("matmul", "table", "bias", "norm")
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def parameter_kind(module: nn.Module, name: str) -> str:
    """The kind of `module`'s own parameter `name` (one of KINDS)."""
    if isinstance(module, nn.Embedding):
        return "table"
    if isinstance(module, NORMS):
        return "norm"
    if isinstance(module, nn.Linear):
        return "matmul" if name == "weight" else "bias"
    kind = getattr(module, "parameter_kinds", {}).get(name)
    if kind not in KINDS:
        raise MsitError(
            f"{type(module).__name__}.{name} is an nn.Parameter of no declared kind: add it to "
            f"{type(module).__name__}.parameter_kinds as one of {list(KINDS)}"
        )
    return kind


def parameters_with_kinds(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, str]]:
    """(full name, parameter, kind) of every parameter of `model`, each once."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield f"{prefix}.{name}" if prefix else name, p, parameter_kind(module, name)


# What a family declares for fine-tuning: parts by what they are for, each a module or a parameter.
Part = nn.Module | nn.Parameter


@dataclass(frozen=True)
class ScenePart:
    """A part that holds rows of its own for each scene (`msit.training.finetune`'s scene mode trains the tuned
    scenes' rows). The leading dimension of each of its parameters holds `rows_per_scene` rows per
    scene, scene id `first_id`'s first: 0 for a table indexed by scene id, FIRST_REAL for one indexed by scene
    slot (msit.data.schema). Or, with `scene_id` set, the whole part belongs to that one scene."""

    part: Part
    first_id: int = 0
    rows_per_scene: int = 1
    scene_id: int | None = None

    def rows(self, p: torch.Tensor, scene_ids: list[int]) -> torch.Tensor:
        """The rows of `p` (a parameter of this part) that belong to these scenes, as a mask."""
        mask = torch.zeros(p.shape[0] if p.ndim else 1, dtype=torch.bool)
        if self.scene_id is not None:
            mask[:] = self.scene_id in scene_ids
            return mask
        for scene_id in scene_ids:
            first = (scene_id - self.first_id) * self.rows_per_scene
            if first < 0 or first + self.rows_per_scene > len(mask):
                raise MsitError(f"scene id {scene_id} has no rows in a per-scene parameter of shape {tuple(p.shape)}")
            mask[first : first + self.rows_per_scene] = True
        return mask


def part_parameters(part: Part) -> list[nn.Parameter]:
    return [part] if isinstance(part, nn.Parameter) else list(part.parameters())


def declared_names(model: nn.Module, parts: dict[str, Part], what: str) -> dict[str, list[str]]:
    """Each declared part's parameter names in `model`. A part that holds no parameter of the model (a
    module left empty by the config, or one that is not the model's) is an error: it would train nothing."""
    names = {id(p): name for name, p in model.named_parameters()}
    found = {}
    for label, part in parts.items():
        found[label] = [names[id(p)] for p in part_parameters(part) if id(p) in names]
        if not found[label]:
            raise MsitError(f"{type(model).__name__} declares {what} {label!r}, which holds no parameter of the model")
    return found

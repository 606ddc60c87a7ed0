"""What a method trains, declared once: named parameter groups.

Each method's ``parameter_groups()`` returns ``{name: ParamGroup}``: every parameter that
training may change (the new token rows, projections, mappers, adapters), grouped, with whether
it trains in this run, its learning-rate multiplier and whether weight decay applies. Everything
else (the frozen backbones) is in no group. From that one declaration:

- ``requires_grad`` is set when the model is built (``MultimodalLM.apply_trainability``), before
  any strategy wraps it, so DDP sees the final set;
- the optimizer's groups are built (``mmgen.methods.optim``);
- checkpoints, exported folders and converters store exactly the grouped parameters, trained
  in this run or not (a MiniGPT-5 stage-2 model still carries its stage-1 ``fc``).

Changing what a method trains is a change to its ``parameter_groups()`` and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class ParamGroup:
    params: list[nn.Parameter] = field(default_factory=list)
    train: bool = True  # trains in this run; a frozen group is still part of the trained model
    lr_scale: float = 1.0  # multiplies the optimizer's base learning rate
    weight_decay: bool = True  # AdamW's decay applies to its matrices (never to biases, norms,
    #                            scalars: parameters of fewer than 2 dimensions)

    def __iter__(self):
        return iter(self.params)

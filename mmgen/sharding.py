"""Sharded frozen backbones: FSDP2 over the frozen transformer blocks, DDP over what trains.

A 7B LLM in bf16 is 13.5 GiB on every GPU under plain DDP, although none of it trains. With
``--trainer.strategy=fsdp_backbones`` each transformer block of the LLM and of the visual
encoder is sharded over the processes with torch's FSDP2 (``fully_shard``): a block's weights are
gathered for its forward (and again for its backward) and freed after, so each GPU stores 1/world
of them. Everything else that trains (new token rows, projections, mappers, heads, prefix
encoders) is small and stays replicated under DDP, as in plain DDP runs; LoRA weights that live
inside a sharded block are sharded with it and FSDP averages their gradients.

Why not Lightning's ``fsdp`` or ``model_parallel`` strategy: the first wraps the whole module and
refuses a CPU run (so it cannot be tested here); the second leaves every parameter outside the
sharded blocks without gradient synchronisation. This strategy is Lightning's DDP with three
additions, each about DTensor parameters that DDP does not know:

- the sharded parameters are excluded from DDP's own broadcast and all-reduce;
- checkpoints hold full tensors (gathered from the shards), so a checkpoint loads without the
  strategy, in one process, and a sharded run resumes from a checkpoint of any world size;
- gradient clipping measures the norm over sharded and replicated gradients together (torch's
  ``clip_grad_norm_`` refuses a mix of DTensor and plain gradients).

The embedding matrices stay replicated (they sit outside the blocks): the new token rows and
their renorm act on the full matrix, as on one device.

    mmgen fit --config configs/minigpt5_stage2.yaml --trainer.strategy=fsdp_backbones
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import nn

#: The components whose transformer blocks are sharded by default: the frozen backbones that
#: dominate memory (the diffusion model's frozen UNet is run by GILL at inference only).
DEFAULT_COMPONENTS = ("llm", "visual_encoder")


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every transformers / diffusers model inside ``module``: the classes
    each model names in ``_no_split_modules`` (the units its own device-map sharding keeps
    whole), innermost first, as FSDP2 requires nested units to be sharded bottom-up."""
    block_names: set[str] = set()
    for sub in module.modules():
        block_names.update(getattr(sub, "_no_split_modules", None) or ())
    blocks = [sub for sub in module.modules() if type(sub).__name__ in block_names]
    depth = {id(b): sum(1 for _ in b.modules()) for b in blocks}
    return sorted(blocks, key=lambda b: depth[id(b)])  # fewer submodules first: inner blocks first


def shard_backbones(model: nn.Module, mesh, components: tuple[str, ...] = DEFAULT_COMPONENTS) -> list[str]:
    """``fully_shard`` each transformer block of ``model``'s ``components`` over ``mesh`` (1-D);
    returns the names of the parameters that became sharded DTensors."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    for name in components:
        component = getattr(model, name, None)
        if component is None:
            continue
        for block in transformer_blocks(component):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over parameters whose gradients are partly sharded DTensors (norms of
    their shards reduced over the mesh) and partly plain replicated tensors; returns the total
    norm. Hand-written because torch's refuses the mix."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad.float())
        squares.append((norm.full_tensor() if is_sharded(norm) else norm) ** 2)
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1.0 and math.isfinite(scale):
        for grad in grads:
            grad.mul_(scale)
    return total


def _local_shard(full: torch.Tensor, like):
    """``full`` (the same on every process) as a DTensor placed like ``like``: each process keeps
    its own shard, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


class ShardedBackbonesDDP(DDPStrategy):
    """DDP whose frozen backbones' transformer blocks are sharded with FSDP2 (module docstring).

    Args:
        components: Attribute names of the method's components whose blocks are sharded.
        **kwargs: Lightning's ``DDPStrategy`` arguments.
    """

    strategy_name = "fsdp_backbones"

    def __init__(self, components: tuple[str, ...] | list[str] = DEFAULT_COMPONENTS, **kwargs):
        super().__init__(**kwargs)
        self.components = tuple(components)
        self.sharded_names: list[str] = []

    def setup(self, trainer) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh
        from torch.nn.parallel import DistributedDataParallel

        # The model is built (configure_model ran) and trainability is set; the blocks are
        # sharded before Lightning moves the model to the device, so only shards are moved.
        # FSDP gets a process group of its own: DDP's bucketed all-reduces run on the default
        # group during the same backward pass, and collectives on one group must be issued in
        # the same order on every process.
        group = dist.new_group(backend=self._get_process_group_backend())
        mesh = DeviceMesh.from_group(group, self.root_device.type)
        self.sharded_names = shard_backbones(self.lightning_module, mesh, self.components)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.lightning_module, self.sharded_names)
        super().setup(trainer)

    # -- checkpoints: full tensors, loadable without the strategy --------------------------------
    def lightning_module_state_dict(self) -> dict:
        """Every process takes part (gathering a sharded tensor is collective); sharded frozen
        weights are left out, as the method's checkpoints hold trainable tensors only."""
        keep = self.lightning_module.trainable_state_keys()
        state = {}
        for name, value in self.lightning_module.state_dict().items():
            if is_sharded(value):
                if name not in keep:
                    continue
                value = value.full_tensor()
            state[name] = value
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        params = dict(self.lightning_module.named_parameters())
        state = dict(checkpoint["state_dict"])
        for name, value in state.items():
            target = params.get(name)
            if target is not None and is_sharded(target) and not is_sharded(value):
                state[name] = _local_shard(value.to(target.dtype), target)
        self.lightning_module.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state with sharded entries gathered (every process takes part)."""
        state = optimizer.state_dict()
        return {**state, "state": {k: {n: (v.full_tensor() if is_sharded(v) else v) for n, v in s.items()}
                                   for k, s in state["state"].items()}}

    def load_optimizer_state_dict(self, checkpoint) -> None:
        for optimizer, stored in zip(self.optimizers, checkpoint["optimizer_states"]):
            params = [p for group in optimizer.param_groups for p in group["params"]]
            state = {}
            for index, entries in stored["state"].items():
                param = params[int(index)]
                state[index] = {
                    n: (_local_shard(v.to(param.device), param) if is_sharded(param) and torch.is_tensor(v) and v.shape == param.shape else v)
                    for n, v in entries.items()
                }
            optimizer.load_state_dict({**stored, "state": state})


StrategyRegistry.register(
    ShardedBackbonesDDP.strategy_name, ShardedBackbonesDDP,
    description="DDP with the frozen backbones' transformer blocks sharded by FSDP2 (mmgen.sharding)",
)

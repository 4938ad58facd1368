"""FSDP2 for the denoiser (`train.parallel: fsdp`): plain PyTorch, no Ray.

`torch.distributed.fsdp.fully_shard` splits every parameter of each block (and what is left at the
root) along dim 0 over the ranks of the default process group: each rank holds 1/world of the
weights, of the AdamW moments and of the EMA (diffusers' EMAModel built over the sharded parameters
keeps sharded shadow copies). A block's parameters are all-gathered just before its forward and
backward and freed after; gradients are reduce-scattered (averaged, as DDP's all-reduce does).

Checkpoints stay in the one format DDP writes: `full_tree` gathers every sharded tensor into a whole
one (a collective: every rank calls it, in the same order), and `shard_like` cuts a whole tensor back
into this rank's piece. So a run checkpointed under DDP resumes under FSDP and the other way round,
and generation loads either without knowing.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

#: Children of the diffusers models that become one FSDP unit each: the UNet's resolution levels and
#: the transformer's blocks. Whatever is not inside one (embeddings, norms, heads) is the root's unit.
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks")
BLOCK_MODULES = ("mid_block",)


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move `model` to `device` and shard it in place over the default process group, which must exist
    (Ray Train sets it up; a one-rank group works and splits nothing)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("train.parallel=fsdp needs a torch.distributed process group (Ray Train sets one up)")
    model.to(device)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for name in BLOCK_LISTS:
        for block in getattr(model, name, None) or []:
            fully_shard(block, mesh=mesh)
    for name in BLOCK_MODULES:
        if getattr(model, name, None) is not None:
            fully_shard(getattr(model, name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tree(obj):
    """`obj` (a state dict, nested dicts/lists/tuples) with every DTensor replaced by the whole tensor.
    A collective when there are DTensors: every rank must call it on the same structure."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, dict):
        return {k: full_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tree(v) for v in obj)
    return obj


def shard_like(value, like):
    """`value` (a whole tensor) as this rank's piece of a DTensor laid out as `like` (a parameter);
    unchanged when `like` is not a DTensor or the shapes differ (AdamW's scalar `step`). Every rank
    holds the whole value (each loaded the checkpoint), so no data moves between ranks."""
    if isinstance(like, DTensor) and isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(like.shape):
        return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return value


def shard_model_state(model: torch.nn.Module, sd: dict) -> dict:
    """A whole-tensor model state dict cut into the pieces `model` (sharded) holds."""
    own = model.state_dict()
    return {k: shard_like(v, own.get(k)) for k, v in sd.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """A whole-tensor optimizer state dict (keyed by parameter index, as torch writes it) cut into the
    pieces of the optimizer's own (sharded) parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: shard_like(v, params[int(i)]) for k, v in per_param.items()} for i, per_param in sd["state"].items()}
    return {**sd, "state": state}

"""A Hugging Face causal LM inside a DeepSpeed engine: one `update` is one optimizer step, state saved as data.

Runs as a single CPU process over gloo unless a launcher has already set the rank environment, in which case the
same code runs data-parallel: every rank is handed the whole update and takes its share of the micro-batches
(`update`), and `sum_over_ranks` pools what each rank computed on its share.

The optimizer state is written as safetensors + JSON, one full-shape tensor per named parameter and Adam moment,
never as a pickle (nothing read back from storage is unpickled). Because it is keyed by parameter name rather than
by ZeRO's flat partitions, it loads into any ZeRO stage 0/1/2 and world size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator when first imported
import deepspeed
from deepspeed import comm as dist
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

MicroBatch = TypeVar("MicroBatch")

OPTIMIZER_FORMAT = "dypo-adamw-by-name/1"
_MOMENTS = ("exp_avg", "exp_avg_sq")


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_rank() -> int:
    """The rank a distributed launcher (torchrun) gave this process, known before the group forms; 0 alone."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of ranks a distributed launcher started; 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_share() -> tuple[int, int]:
    """(this process's rank, the world size): (0, 1) outside a distributed launch."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """`tensor` summed element-wise over all ranks, in place (each rank fills its share, zeros elsewhere)."""
    if rank_share()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def _init_distributed(extensions_dir: Path) -> None:
    """Join (or, alone, form) the process group once per process; later trainers reuse it.

    Under a launcher (the multi-node Indexed Job sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) the ranks
    meet over TCP. Alone, the group of one is formed on an in-memory store: no port, so stage processes started
    side by side on one host (container and deployment launchers, shards) cannot race for one. DeepSpeed then
    adopts the initialised group. It JIT-builds a shared-memory comm op with g++ here, into TORCH_EXTENSIONS_DIR
    (~35 s the first time).
    """
    if dist.is_initialized():
        return
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    launched = [key for key in _LAUNCHER_ENV if key in os.environ]
    if launched and len(launched) < len(_LAUNCHER_ENV):
        missing = ", ".join(key for key in _LAUNCHER_ENV if key not in os.environ)
        raise RuntimeError(f"a distributed launch sets {', '.join(_LAUNCHER_ENV)}; {missing} missing. Set all of "
                           "them (see k8s/optimize-multinode) or none for a single process")
    if not launched:
        os.environ.setdefault("LOCAL_RANK", "0")
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")


class DeepSpeedTrainer:
    """AdamW on a causal LM through DeepSpeed ZeRO 0/1/2 in fp32, with gradient accumulation and clipping."""

    def __init__(self, model: PreTrainedModel, *, learning_rate: float, zero_stage: Literal[0, 1, 2],
                 max_grad_norm: float, extensions_dir: Path) -> None:
        _init_distributed(extensions_dir)
        config = {
            # DeepSpeed insists on a batch size; micro-batches are sized by the caller and the accumulation
            # boundary is marked in `update`, so these only feed DeepSpeed's own sample counters.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": max_grad_norm,
            "zero_optimization": {"stage": zero_stage},
            "steps_per_print": 2**31 - 1,
        }
        # A torch optimizer object, not a config-dict one: DeepSpeed would JIT-compile FusedAdam for minutes.
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.zero_stage = zero_stage

    @property
    def model(self) -> PreTrainedModel:
        return self.engine.module

    def update(self, micro_batches: Sequence[MicroBatch],
               loss_fn: Callable[[torch.nn.Module, MicroBatch], tuple[Tensor, dict[str, float]]]) -> dict[str, float]:
        """Accumulate gradients over the update's micro-batches, then take exactly one optimizer step.

        Every rank is given all micro-batches of the update and runs its share (every world-size-th one).
        `loss_fn(engine, micro_batch)` (call the engine like the model) returns the micro-batch's loss and
        statistics, both already normalised by the whole batch (see dypo_loss), so they are summed, over
        micro-batches and ranks: the result, the same on every rank, holds the batch's loss and means, plus
        `grad_norm`, the global gradient norm before clipping.
        """
        if not micro_batches:
            raise ValueError("an update needs at least one micro-batch")
        rank, world = rank_share()
        # ZeRO 2 reduces gradients in every backward (stage 0 at the boundary), so all ranks must run as many: a
        # rank whose share is one short (or empty) pads it with a micro-batch of weight 0, whose gradient is zero.
        share = [(micro_batch, 1.0) for micro_batch in micro_batches[rank::world]]
        share += [(micro_batches[0], 0.0)] * (-(-len(micro_batches) // world) - len(share))
        self.engine.train()
        totals: dict[str, float] = {"loss": 0.0}
        for index, (micro_batch, weight) in enumerate(share):
            # the last backward closes the accumulation, so that engine.step() updates the weights
            self.engine.set_gradient_accumulation_boundary(index == len(share) - 1)
            loss, stats = loss_fn(self.engine, micro_batch)
            # DeepSpeed averages gradients over ranks; scaled by the world size, their sum is the batch's gradient
            self.engine.backward(loss * (weight * world))
            for key, value in {"loss": loss.item(), **stats}.items():
                totals[key] = totals.get(key, 0.0) + weight * value
        names = sorted(totals)
        summed = sum_over_ranks(torch.tensor([totals[name] for name in names], dtype=torch.float64))
        totals = dict(zip(names, summed.tolist(), strict=True))
        # ZeRO 1/2 report the norm they clip with; stage 0 does not, so measure its reduced gradients before the step.
        grad_norm = self._gradient_norm() if self.zero_stage == 0 else None
        self.engine.step()
        totals["grad_norm"] = grad_norm if grad_norm is not None else float(self.engine.get_global_grad_norm())
        return totals

    def _gradient_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item()

    def save(self, model_dir: Path, optimizer_dir: Path, tokenizer: PreTrainedTokenizerBase) -> None:
        """Write the HF checkpoint (safetensors + tokenizer) and the optimizer state; rank 0 writes.

        Every rank must call this: gathering ZeRO-partitioned moments is a collective.
        """
        step, tensors = self._optimizer_state()
        if dist.get_rank() != 0:
            return
        self.engine.module.save_pretrained(model_dir)  # transformers 5 always writes model.safetensors
        tokenizer.save_pretrained(model_dir)
        optimizer_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, optimizer_dir / "optimizer.safetensors")
        group = self._base_optimizer().param_groups[0]
        meta = {
            "format": OPTIMIZER_FORMAT,
            "step": step,
            # for the record only: a resumed run takes its hyperparameters from its config
            "hyperparameters": {key: group[key] for key in ("lr", "betas", "eps", "weight_decay")},
            "saved_with_zero_stage": self.zero_stage,
        }
        (optimizer_dir / "optimizer.json").write_text(json.dumps(meta, indent=2) + "\n")

    def load_optimizer(self, optimizer_dir: Path) -> None:
        """Restore AdamW's step and moments written by `save`, into whatever ZeRO stage this engine uses."""
        meta = json.loads((optimizer_dir / "optimizer.json").read_text())
        if meta.get("format") != OPTIMIZER_FORMAT:
            raise ValueError(f"{optimizer_dir}: optimizer state format {meta.get('format')!r}, expected "
                             f"{OPTIMIZER_FORMAT!r}")
        tensors = load_file(optimizer_dir / "optimizer.safetensors")
        params = dict(self.engine.module.named_parameters())
        expected = {f"{key}/{name}" for name in params for key in _MOMENTS} if meta["step"] else set()
        if set(tensors) != expected:
            diff = sorted(set(tensors) ^ expected)
            raise ValueError(f"{optimizer_dir}: optimizer state does not match the model's parameters "
                             f"({len(diff)} names differ, e.g. {diff[:3]})")
        if not meta["step"]:
            return  # saved before the first update: AdamW creates its state lazily, as it would have

        base = self._base_optimizer()
        step = meta["step"]
        if self.zero_stage == 0:
            for name, param in params.items():
                base.state[param] = {"step": torch.tensor(float(step)),
                                     **{key: tensors[f"{key}/{name}"].to(param.device) for key in _MOMENTS}}
            return

        # ZeRO keeps one flat fp32 partition per group; create its state, point each parameter's fragment at
        # it, then scatter the full moments into the fragments this rank owns.
        zero = self.engine.optimizer
        for lp_params, group in zip(zero.bit16_groups, base.param_groups, strict=True):
            flat = group["params"][0]
            base.state[flat] = {"step": torch.tensor(float(step)), **{key: torch.zeros_like(flat) for key in _MOMENTS}}
            lazy_init_hp_params_optimizer_state(lp_params, flat, base.state)
        for name, param in params.items():
            for key in _MOMENTS:
                safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"].to(param.device), key)

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW itself: ZeRO wraps it (it steps flat partitions), stage 0 uses it as is."""
        return self.engine.optimizer.optimizer if self.zero_stage else self.engine.optimizer

    def _optimizer_state(self) -> tuple[int, dict[str, Tensor]]:
        """AdamW's step count and its moments per named parameter in full parameter shape."""
        base = self._base_optimizer()
        steps = {int(state["step"]) for state in base.state.values()}
        if not steps:
            return 0, {}
        if len(steps) > 1:
            raise RuntimeError(f"parameters were stepped unequally ({sorted(steps)}); cannot save one step count")
        tensors: dict[str, Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            for key in _MOMENTS:
                value = safe_get_full_optimizer_state(param, key) if self.zero_stage else base.state[param][key]
                tensors[f"{key}/{name}"] = value.detach().cpu().contiguous()
        return steps.pop(), tensors

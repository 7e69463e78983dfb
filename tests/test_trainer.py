"""DeepSpeedTrainer on a tiny Qwen2: one update = one optimizer step, ZeRO stages agree, resume is exact."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dypo.stages.dypo_loss import sft_loss, token_logprobs
from dypo.stages.sequences import TrainingSequence, collate
from dypo.stages.trainer import DeepSpeedTrainer

PROJECT = Path(__file__).resolve().parents[1]
Batch = dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def extensions_dir() -> Path:
    """One cache for DeepSpeed's JIT-built comm op, so g++ runs once per machine, not once per test."""
    return PROJECT / ".cache" / "torch_extensions"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, 300)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def initial_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Qwen2, saved once so every trainer starts from identical weights."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("model") / "initial"
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sequences() -> list[TrainingSequence]:
    generator = torch.Generator().manual_seed(1)
    return [TrainingSequence(torch.randint(1, 300, (n,), generator=generator).tolist(), [0] * 4 + [1] * (n - 4), 0.0)
            for n in (12, 9, 15, 7)]


def sft(num_tokens_total: int) -> Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(engine: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logp, _ = token_logprobs(engine, batch["input_ids"], batch["attention_mask"])
        return sft_loss(logp, batch["loss_mask"], num_tokens_total), {"tokens": batch["loss_mask"].sum().item()}
    return loss_fn


def make_trainer(model_dir: Path, zero_stage: int, extensions_dir: Path) -> DeepSpeedTrainer:
    return DeepSpeedTrainer(Qwen2ForCausalLM.from_pretrained(model_dir), learning_rate=1e-2, zero_stage=zero_stage,
                            max_grad_norm=1.0, extensions_dir=extensions_dir)


def update(trainer: DeepSpeedTrainer, seqs: list[TrainingSequence], size: int = 2) -> dict[str, float]:
    total = sum(seq.num_loss_tokens for seq in seqs)
    chunks = [seqs[start:start + size] for start in range(0, len(seqs), size)]
    return trainer.update([collate(chunk, pad_id=0) for chunk in chunks], sft(total))


def weights(trainer: DeepSpeedTrainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return torch.cat([value.flatten() for value in tensors.values()]).norm().item()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_each_update_is_one_step_and_the_repeated_sft_loss_falls(
        zero_stage: int, initial_model: Path, sequences: list[TrainingSequence], extensions_dir: Path) -> None:
    trainer = make_trainer(initial_model, zero_stage, extensions_dir)
    before = weights(trainer)
    results = [update(trainer, sequences)]
    assert max_difference(before, weights(trainer)) > 1e-4
    results += [update(trainer, sequences) for _ in range(5)]
    losses = [result["loss"] for result in results]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(later < earlier for earlier, later in pairwise(losses)), losses
    assert trainer.engine.global_steps == 6  # one optimizer step per update, whatever the micro-batch count
    assert results[0]["tokens"] == sum(seq.num_loss_tokens for seq in sequences)  # stats summed over micro-batches
    assert all(0 < result["grad_norm"] < float("inf") for result in results)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_accumulated_micro_batches_equal_one_big_batch(
        zero_stage: int, initial_model: Path, sequences: list[TrainingSequence], extensions_dir: Path) -> None:
    accumulated, whole = (make_trainer(initial_model, zero_stage, extensions_dir) for _ in range(2))
    before = weights(whole)
    stats_accumulated = update(accumulated, sequences, size=1)
    stats_whole = update(whole, sequences, size=len(sequences))
    assert stats_accumulated["loss"] == pytest.approx(stats_whole["loss"], rel=1e-6)
    assert stats_accumulated["grad_norm"] == pytest.approx(stats_whole["grad_norm"], rel=1e-5)
    # Padding changes float rounding (gradients agree to ~1e-7) and Adam's first step, g / (|g| + eps),
    # magnifies that for tiny gradients, so compare the two updates relative to their size.
    after_accumulated, after_whole = weights(accumulated), weights(whole)
    step = {name: after_whole[name] - before[name] for name in before}
    gap = {name: after_accumulated[name] - after_whole[name] for name in before}
    assert norm(gap) < 1e-4 * norm(step)


def test_zero_stages_0_and_2_take_the_same_step(
        initial_model: Path, sequences: list[TrainingSequence], extensions_dir: Path) -> None:
    plain, zero2 = (make_trainer(initial_model, stage, extensions_dir) for stage in (0, 2))
    stats_plain, stats_zero2 = update(plain, sequences), update(zero2, sequences)
    assert stats_plain["grad_norm"] == pytest.approx(stats_zero2["grad_norm"], rel=1e-5)
    assert stats_plain["grad_norm"] > 1.0  # so clipping to max_grad_norm=1 was exercised in both
    assert max_difference(weights(plain), weights(zero2)) < 1e-6


@pytest.mark.parametrize(("save_stage", "load_stage"), [(0, 0), (1, 1), (2, 2), (2, 0)])
def test_resuming_from_saved_model_and_optimizer_equals_continuous_training(
        save_stage: int, load_stage: int, initial_model: Path, sequences: list[TrainingSequence],
        tokenizer: PreTrainedTokenizerFast, extensions_dir: Path, tmp_path: Path) -> None:
    first, second = sequences[:2], sequences[2:]
    continuous = make_trainer(initial_model, save_stage, extensions_dir)
    update(continuous, first)
    update(continuous, second)

    interrupted = make_trainer(initial_model, save_stage, extensions_dir)
    update(interrupted, first)
    interrupted.save(tmp_path / "model", tmp_path / "optimizer", tokenizer)
    resumed = make_trainer(tmp_path / "model", load_stage, extensions_dir)
    resumed.load_optimizer(tmp_path / "optimizer")
    update(resumed, second)
    assert max_difference(weights(continuous), weights(resumed)) < 1e-6

    fresh_optimizer = make_trainer(tmp_path / "model", load_stage, extensions_dir)
    update(fresh_optimizer, second)
    assert max_difference(weights(continuous), weights(fresh_optimizer)) > 1e-3  # the state really mattered

    saved = {path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()}
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json", "optimizer/optimizer.json",
            "optimizer/optimizer.safetensors"} <= saved
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pth", ".pkl"))]


def test_optimizer_state_saved_before_any_update_loads_as_fresh(
        initial_model: Path, sequences: list[TrainingSequence], tokenizer: PreTrainedTokenizerFast,
        extensions_dir: Path, tmp_path: Path) -> None:
    make_trainer(initial_model, 2, extensions_dir).save(tmp_path / "model", tmp_path / "optimizer", tokenizer)
    resumed, fresh = (make_trainer(initial_model, 2, extensions_dir) for _ in range(2))
    resumed.load_optimizer(tmp_path / "optimizer")
    update(resumed, sequences)
    update(fresh, sequences)
    assert max_difference(weights(resumed), weights(fresh)) == 0


def test_load_optimizer_rejects_state_of_another_model(
        initial_model: Path, sequences: list[TrainingSequence], tokenizer: PreTrainedTokenizerFast,
        extensions_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(initial_model, 0, extensions_dir)
    update(trainer, sequences)
    trainer.save(tmp_path / "model", tmp_path / "optimizer", tokenizer)
    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    mismatched = DeepSpeedTrainer(other, learning_rate=1e-2, zero_stage=0, max_grad_norm=1.0,
                                  extensions_dir=extensions_dir)
    with pytest.raises(ValueError, match="does not match"):
        mismatched.load_optimizer(tmp_path / "optimizer")


_INIT = ("import sys, os, pathlib; from dypo.stages.trainer import _init_distributed; "
         "_init_distributed(pathlib.Path(os.environ['TORCH_EXTENSIONS_DIR'])); "
         "import torch.distributed as d; print(d.get_world_size(), os.environ.get('MASTER_PORT'))")


def _init_in_fresh_processes(count: int = 1, **launcher_env: str) -> list[subprocess.CompletedProcess]:
    """`_init_distributed` in `count` fresh processes started together, with only `launcher_env` of the launch
    variables set."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                                          "MASTER_PORT", "LOCAL_RANK")}
    processes = [subprocess.Popen([sys.executable, "-c", _INIT], env={**env, **launcher_env}, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(count)]
    outputs = [process.communicate(timeout=300) for process in processes]
    return [subprocess.CompletedProcess(process.args, process.returncode, *output)
            for process, output in zip(processes, outputs, strict=True)]


def test_single_processes_form_their_groups_without_a_port():
    """Stage processes starting side by side on one host must not race for a rendezvous port."""
    for done in _init_in_fresh_processes(2):
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-2:] == ["1", "None"]


def test_a_partial_launcher_environment_is_refused_with_what_is_missing():
    [done] = _init_in_fresh_processes(RANK="0", WORLD_SIZE="2")
    assert done.returncode != 0
    assert "MASTER_ADDR, MASTER_PORT missing" in done.stderr

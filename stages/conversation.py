"""How an episode becomes tokens: one ChatML conversation, shared by the rollout engine and the warmstart.

An episode is the sequence `[prompt, gen_1, obs_1, gen_2, obs_2, …, gen_T]`. Each piece is encoded on its own
and the ids are concatenated, never the joined text re-encoded: byte-level BPE can merge across a boundary
(a generated turn's last bytes with the next observation's first), and the model may have sampled a
tokenization the encoder would not produce. Either way a re-encoded text is not what the policy saw or sampled,
and training on it would be off-policy. Encoding pieces separately makes rollout, warmstart and optimize agree
on the ids by construction.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from dypo.stages.environments.protocol import ExpertTurn
from dypo.stages.policy import IM_END, IM_START
from dypo.stages.turn_format import render_turn


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, system_prompt: str, first_observation: str) -> list[int]:
    """The system message (the env family's prompt: task and turn format), the first observation as the user
    message, and the opened assistant message."""
    return (
        _encode(tokenizer, f"{IM_START}system\n")
        + _encode(tokenizer, system_prompt)
        + _encode(tokenizer, f"{IM_END}\n{IM_START}user\n")
        + _encode(tokenizer, first_observation)
        + _encode(tokenizer, f"{IM_END}\n{IM_START}assistant\n")
    )


def observation_ids(tokenizer: PreTrainedTokenizerBase, observation: str) -> list[int]:
    """What follows a generated turn: close the assistant message, the observation as user message, reopen.

    It is the same whatever ended the turn (`</action>`, `<|im_end|>` or the token budget), so a turn's context
    piece depends on the observation alone.
    """
    return (
        _encode(tokenizer, f"{IM_END}\n{IM_START}user\n")
        + _encode(tokenizer, observation)
        + _encode(tokenizer, f"{IM_END}\n{IM_START}assistant\n")
    )


def turn_ids(tokenizer: PreTrainedTokenizerBase, think: str, action: str) -> list[int]:
    """A well-formed turn as the policy should generate it, ending with the `</action>` stop token."""
    return _encode(tokenizer, render_turn(think, action))


def expert_sequence(tokenizer: PreTrainedTokenizerBase, system_prompt: str,
                    turns: list[ExpertTurn]) -> tuple[list[int], list[int]]:
    """An expert episode as (input_ids, loss_mask), laid out exactly as a rollout of the same turns would be.

    The mask is 1 on the turn tokens (through the closing `</action>`) and 0 on prompt and observations, the
    same masking the optimize stage applies to sampled episodes.
    """
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for index, turn in enumerate(turns):
        context = (prompt_ids(tokenizer, system_prompt, turn.observation) if index == 0
                   else observation_ids(tokenizer, turn.observation))
        generated = turn_ids(tokenizer, turn.think, turn.action)
        input_ids += context + generated
        loss_mask += [0] * len(context) + [1] * len(generated)
    return input_ids, loss_mask

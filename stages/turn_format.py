"""The turn format (DESIGN.md §1.1): what the policy writes each turn, and how we read it back.

A turn is `<think>reasoning</think><action>one command</action>`; generation stops at `</action>`. Only the
text inside `<action>` reaches the environment, so a turn the parser cannot read unambiguously is *malformed*:
the game receives nothing, the turn is flagged, and its reason is recorded for the filter and the audit tables.

Decisions:
- The think block is optional. The action is what the game needs; a turn that acts without reasoning is still
  a usable turn, and penalizing it as malformed would mix format shaping into the task reward. If a think block
  is present it must be well formed: opened and closed once, before the action, with no tag inside.
- Surrounding whitespace of think and action is dropped (it is formatting, not content); nothing else is
  normalized, because the environment matches commands exactly and the model should learn to write them so.
- Only the four exact tags count as tags; anything else (`<Action>`, `<act`) is plain text.
- A turn that opens a chat message (`<|im_start|>`, as in `<|im_start|>user`) or an `<observation>` block is
  writing the environment's side of the conversation: that is a hallucinated observation, whatever else it holds.
- When the env lists its admissible commands and the caller asks for the check, an action outside that list is
  malformed too (NOT_ADMISSIBLE): the model did produce a command, but not one the game can execute.
- A malformed turn carries neither think nor action, so no caller can send a half-parsed command by mistake;
  the raw generated text is stored beside the parse anyway.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ACTION_OPEN, ACTION_CLOSE = "<action>", "</action>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE)
_TAG = re.compile("|".join(re.escape(tag) for tag in _TAGS))

SYSTEM_PROMPT = (
    "You are playing a text game. Each turn, reason briefly, then give exactly one command, in this form:\n"
    "<think>your reasoning</think><action>your command</action>\n"
    "Then you will see what happened."
)


class MalformedReason(StrEnum):
    """Why a turn yielded no action; the values are stored in turns.parquet."""

    NO_ACTION = "no_action"  # the turn ended without any action tag
    UNTERMINATED_ACTION = "unterminated_action"  # `<action>` opened, the turn ended before `</action>`
    BUDGET_EXHAUSTED = "budget_exhausted"  # the token budget ran out before `</action>`
    EMPTY_ACTION = "empty_action"  # `<action></action>` with nothing but whitespace inside
    REPEATED_TAG = "repeated_tag"  # a tag occurs twice before the turn's `</action>`
    MISPLACED_TAG = "misplaced_tag"  # tags nested, unmatched or out of order
    STRAY_TEXT = "stray_text"  # text outside the blocks, before or between them
    TEXT_AFTER_ACTION = "text_after_action"  # the model kept writing past `</action>` (over-generation)
    HALLUCINATED_OBSERVATION = "hallucinated_observation"  # the model wrote the next message (the env's) itself
    NOT_ADMISSIBLE = "not_admissible"  # a well-formed action the env does not list among its admissible commands


@dataclass(frozen=True)
class ParsedTurn:
    """The reading of one generated turn: malformed iff reason is set, and then think and action are None."""

    think: str | None
    action: str | None
    malformed: bool
    reason: MalformedReason | None


def render_turn(think: str, action: str) -> str:
    """A well-formed turn, as expert data and tests write it."""
    for part in (think, action):
        if _TAG.search(part):
            raise ValueError(f"turn text must not contain format tags, got {part!r}")
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ACTION_OPEN}{action}{ACTION_CLOSE}"


# Markers of text that belongs to the environment's message, not to the policy's turn.
_OBSERVATION_MARKERS = ("<|im_start|>", "<observation>", "</observation>")


def _malformed(reason: MalformedReason) -> ParsedTurn:
    return ParsedTurn(think=None, action=None, malformed=True, reason=reason)


def parse_turn(text: str, budget_exhausted: bool = False, admissible: Sequence[str] | None = None) -> ParsedTurn:
    """Read a generated turn; `budget_exhausted` says generation hit max_new_tokens instead of a stop token.

    The turn is the text up to the first `</action>`; anything but whitespace after it is over-generation
    (TEXT_AFTER_ACTION), reported before any defect of the turn itself because it is the signal the filter acts
    on; a hallucinated observation anywhere in the text is reported before that. Without `</action>` the turn has
    no action, and the reason says why: the budget ran out, the action was left open, or there never was one.
    `admissible`, when given, is the env's list of executable commands; the action must be one of them.
    """
    if any(marker in text for marker in _OBSERVATION_MARKERS):
        return _malformed(MalformedReason.HALLUCINATED_OBSERVATION)
    end = text.find(ACTION_CLOSE)
    if end < 0:
        if budget_exhausted:
            return _malformed(MalformedReason.BUDGET_EXHAUSTED)
        if ACTION_OPEN in text:
            return _malformed(MalformedReason.UNTERMINATED_ACTION)
        return _malformed(MalformedReason.NO_ACTION)
    if text[end + len(ACTION_CLOSE):].strip():
        return _malformed(MalformedReason.TEXT_AFTER_ACTION)

    turn = text[:end + len(ACTION_CLOSE)]
    tags = [match.group() for match in _TAG.finditer(turn)]
    if len(set(tags)) < len(tags):
        return _malformed(MalformedReason.REPEATED_TAG)
    # Each tag now occurs at most once; the valid orders are exactly these two.
    if tags not in ([ACTION_OPEN, ACTION_CLOSE], [THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE]):
        return _malformed(MalformedReason.MISPLACED_TAG)

    before_action, _, rest = turn.partition(ACTION_OPEN)
    action = rest[:-len(ACTION_CLOSE)].strip()
    think = None
    if THINK_OPEN in before_action:
        lead, _, rest = before_action.partition(THINK_OPEN)
        think, _, between = rest.partition(THINK_CLOSE)
        think = think.strip()
        outside = lead + between
    else:
        outside = before_action
    if outside.strip():
        return _malformed(MalformedReason.STRAY_TEXT)
    if not action:
        return _malformed(MalformedReason.EMPTY_ACTION)
    if admissible is not None and action not in admissible:
        return _malformed(MalformedReason.NOT_ADMISSIBLE)
    return ParsedTurn(think=think, action=action, malformed=False, reason=None)

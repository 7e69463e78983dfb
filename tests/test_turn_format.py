"""The turn format: what counts as a well-formed turn, and why the others are malformed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dypo.stages.turn_format import SYSTEM_PROMPT, MalformedReason, ParsedTurn, parse_turn, render_turn

R = MalformedReason

VALID = [
    ("<think>the coin is here</think><action>take coin</action>", "the coin is here", "take coin"),
    ("<think> padded </think>\n<action>  move north </action>\n", "padded", "move north"),
    ("<think></think><action>look around</action>", "", "look around"),
    ("<action>inventory</action>", None, "inventory"),  # the think block is optional
    ("<think>a < b and <act></think><action>move <west></action>", "a < b and <act>", "move <west>"),
]

MALFORMED = [
    ("<think>no action here</think>", False, R.NO_ACTION),
    ("", False, R.NO_ACTION),
    ("<think>x</think><action>move north", False, R.UNTERMINATED_ACTION),
    ("<think>x</think><action>move north<|im_end|>", False, R.UNTERMINATED_ACTION),
    ("<think>x</think><action>move no", True, R.BUDGET_EXHAUSTED),
    ("<think>still thinking when the budget", True, R.BUDGET_EXHAUSTED),
    ("<think>x</think><action>   </action>", False, R.EMPTY_ACTION),
    ("<think>a</think><think>b</think><action>move north</action>", False, R.REPEATED_TAG),
    ("<think>x</think><action><action>move north</action>", False, R.REPEATED_TAG),
    ("<think>x<action>move north</action>", False, R.MISPLACED_TAG),
    ("<think>x <action>move north</action></think>", False, R.TEXT_AFTER_ACTION),
    ("<action>move north</think></action>", False, R.MISPLACED_TAG),
    ("<action>move <think>x</think> north</action>", False, R.MISPLACED_TAG),
    ("move north</action>", False, R.MISPLACED_TAG),
    ("</think>x<think><action>move north</action>", False, R.MISPLACED_TAG),
    ("Sure! <think>x</think><action>move north</action>", False, R.STRAY_TEXT),
    ("<think>x</think> then <action>move north</action>", False, R.STRAY_TEXT),
    ("<think>x</think><action>move north</action>\nYou are in the pantry.", False, R.TEXT_AFTER_ACTION),
    ("<think>x</think><action>move north</action><action>take coin</action>", False, R.TEXT_AFTER_ACTION),
    ("<think>x</think><action>move north</action><|im_start|>user\nYou are in the pantry.", False,
     R.HALLUCINATED_OBSERVATION),
    ("<think>x</think><observation>You see a coin.</observation><action>take coin</action>", False,
     R.HALLUCINATED_OBSERVATION),
    ("<think>I imagine <|im_start|>user", True, R.HALLUCINATED_OBSERVATION),
]
ADMISSIBLE = ["look around", "move north", "take coin"]


@pytest.mark.parametrize(("text", "think", "action"), VALID)
def test_valid_turns(text: str, think: str | None, action: str) -> None:
    assert parse_turn(text) == ParsedTurn(think=think, action=action, malformed=False, reason=None)


def test_every_reason_has_a_case() -> None:
    covered = {reason for _, _, reason in MALFORMED} | {R.NOT_ADMISSIBLE}  # the latter: see the next tests
    assert covered == set(MalformedReason)


def test_an_action_outside_the_admissible_commands_is_malformed() -> None:
    assert parse_turn("<think>x</think><action>move west</action>", admissible=ADMISSIBLE) == ParsedTurn(
        think=None, action=None, malformed=True, reason=R.NOT_ADMISSIBLE)
    assert parse_turn("<think>x</think><action>move north</action>", admissible=ADMISSIBLE).action == "move north"


def test_without_an_admissible_list_any_well_formed_action_passes() -> None:
    assert parse_turn("<action>move west</action>", admissible=None).action == "move west"
    # a format defect is reported as such even when the action would not be admissible either
    assert parse_turn("<action>   </action>", admissible=ADMISSIBLE).reason == R.EMPTY_ACTION


@pytest.mark.parametrize(("text", "budget_exhausted", "reason"), MALFORMED)
def test_malformed_turns(text: str, budget_exhausted: bool, reason: MalformedReason) -> None:
    assert parse_turn(text, budget_exhausted=budget_exhausted) == ParsedTurn(None, None, True, reason)


def test_a_complete_turn_is_valid_even_if_the_budget_ran_out_on_its_last_token() -> None:
    assert not parse_turn("<think>x</think><action>take coin</action>", budget_exhausted=True).malformed


def test_render_is_exact_and_refuses_tags_in_its_text() -> None:
    assert render_turn("go", "move east") == "<think>go</think><action>move east</action>"
    with pytest.raises(ValueError, match="format tags"):
        render_turn("x", "take coin</action>")


def test_system_prompt_shows_the_format() -> None:
    assert "<think>" in SYSTEM_PROMPT and "<action>" in SYSTEM_PROMPT
    assert parse_turn(SYSTEM_PROMPT.splitlines()[1]).action == "your command"


tag_free = st.text(alphabet=st.characters(exclude_characters="<>"))


@given(think=tag_free, action=tag_free.filter(lambda text: text.strip()))
def test_render_then_parse_round_trips(think: str, action: str) -> None:
    assert parse_turn(render_turn(think, action)) == ParsedTurn(think.strip(), action.strip(), False, None)

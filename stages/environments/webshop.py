"""WebShop as an environment family: buy the product an instruction describes, on a shopping site served over HTTP.

The engine (WebShop's Flask app with its 1.18M products or a 1,000-product subset, its search index and its
instructions) is not installable from a package registry, so the user runs it (docs/environments.md says how) and
`env.webshop.url` points at it; the family is "needs server" until that URL answers like WebShop.

Protocol. The session is an HTTP client of the app's routes, as WebShop's own text-mode agents use them: a task is
goal number i of the server's shuffled goal list. WebShop gives a session whose id contains "fixed" the goal its id
ends with (`fixed_…_i`), so every episode opens its own session `fixed_<random>_i`: the app's per-session state and
`--log` files then never mix two episodes. Every page is a GET whose URL carries the whole state (query, result
page, product, chosen options):

    /<session>                                                  the search page, with the instruction
    /search_results/<session>/<query>/<page>                    ten results per page
    /item_page/<session>/<asin>/<query>/<page>/<options>        a product; options is a Python dict literal
    /item_sub_page/<session>/<asin>/<query>/<page>/<sub>/<options>   its Description, Features or Reviews
    /done/<session>/<asin>/<options>                            the purchase, scored by the server

Actions are WebShop's text-mode actions: `search[keywords]` where the page has a search box (the search page) and
`click[label]` for a button, a result's product id or an option on the page; labels match case-insensitively, as in
WebShop's text environment. Anything else leaves the page as it is and says what is possible. Clicking an option
answers "You have clicked <option>." (as WebShop's ReAct-style agents see it); other clicks show the new page as
text: buttons and links in brackets, option groups on one line, the instruction only on the first page (it does not
change).

Reward. The episode ends at "Buy Now": WebShop scores the purchase by how well the product's attributes, the chosen
options and the price match the goal (0-1, reported as the score and the step's reward), and `won` is a score of 1.

Admissible commands: the page's clicks as `click[…]`; on the search page, where any `search[…]` is allowed, None.
There is no expert: over HTTP nothing reveals the goal's product before the purchase.
"""

from __future__ import annotations

import math
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import ClassVar
from urllib.parse import quote

from dypo.stages.config import EnvConfig, WebShopOptions
from dypo.stages.environments.protocol import (
    HELDOUT,
    TRAIN,
    Availability,
    EnvError,
    EnvFamily,
    Status,
    StepResult,
    format_prompt,
)
from dypo.stages.trajectory import Task

TEST = "test"
SPLITS = (TRAIN, HELDOUT, TEST)
SCORE_LABEL = "Your score (min 0.0, max 1.0)"
BUY, BACK, NEXT, PREV = "Buy Now", "Back to Search", "Next >", "< Prev"
SUB_PAGES = ("Description", "Features", "Reviews", "Attributes")
_PROBE_TIMEOUT_S = 3.0
_ACTION = re.compile(r"(search|click)\[(.*)\]", re.DOTALL)
_START = ("to start WebShop's server: git clone https://github.com/princeton-nlp/WebShop && cd WebShop && "
          "./setup.sh -d all && python -m web_agent_site.app (it listens on port 3000); then set env.webshop.url")


# --- Reading WebShop's pages -------------------------------------------------------------------------------------


@dataclass
class Page:
    """What an agent can read and click on one WebShop page, in document order."""

    instruction: str = ""
    lines: list[str] = field(default_factory=list)  # the page as text, buttons and links in brackets
    clickables: dict[str, str] = field(default_factory=dict)  # lower-cased label -> label as shown
    option_groups: dict[str, str] = field(default_factory=dict)  # option value -> its group ("size")
    has_search: bool = False
    score: float | None = None  # on the page after a purchase


class _PageParser(HTMLParser):
    """Collects a Page from WebShop's HTML: visible text, `btn` buttons, `product-link` links and radio options."""

    _INVISIBLE: ClassVar[set[str]] = {"head", "title", "script", "style"}

    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self._stack: list[tuple[str, str]] = []  # open tags and what their text is: text|button|link|option|hidden
        self._instruction_depth: int | None = None
        self._labels: dict[str, tuple[str, str]] = {}  # radio input id -> (group, value)
        self._texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "input":  # void element: nothing is pushed
            if attributes.get("id") == "search_input":
                self.page.has_search = True
            elif attributes.get("type") == "radio":
                self._labels[attributes.get("id", "")] = (attributes.get("name", ""), attributes.get("value", ""))
            return
        parent = self._stack[-1][1] if self._stack else "text"
        style = attributes.get("style", "").replace(" ", "")
        if parent == "hidden" or tag in self._INVISIBLE or "hidden" in attributes or "display:none" in style:
            kind = "hidden"
        elif tag == "button":
            kind = "button"
        elif tag == "a" and "product-link" in attributes.get("class", "").split():
            kind = "link"
        elif tag == "label" and attributes.get("for") in self._labels:
            kind = "option:" + attributes["for"]
        else:
            kind = parent
        if attributes.get("id") == "instruction-text":
            self._instruction_depth = len(self._stack)
        self._stack.append((tag, kind))

    def handle_endtag(self, tag: str) -> None:
        """Close `tag` and whatever was left open inside it (<br>, <img>); a stray end tag is ignored."""
        open_tags = [open_tag for open_tag, _ in self._stack]
        if tag not in open_tags:
            return
        del self._stack[len(open_tags) - 1 - open_tags[::-1].index(tag):]
        if self._instruction_depth is not None and len(self._stack) <= self._instruction_depth:
            self._instruction_depth = None

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        kind = self._stack[-1][1] if self._stack else "text"
        if not text or kind == "hidden":
            return
        page = self.page
        if self._instruction_depth is not None:
            if text != "Instruction:":
                page.instruction = f"{page.instruction} {text}".strip()
            return
        self._texts.append(text)
        if kind in ("button", "link"):
            page.clickables[text.lower()] = text
            page.lines.append(f"[{text}]")
        elif kind.startswith("option:"):
            group, value = self._labels[kind.removeprefix("option:")]
            page.clickables[value.lower()] = value
            page.option_groups[value] = group
            # A group's options go on one line, after the group's name (a heading just before them).
            if page.lines and page.lines[-1].startswith(f"{group}: ["):
                page.lines[-1] += f" [{value}]"
            elif page.lines and page.lines[-1] == group:
                page.lines[-1] = f"{group}: [{value}]"
            else:
                page.lines.append(f"{group}: [{value}]")
        elif self._texts[-2:-1] == [SCORE_LABEL]:
            page.score = float(text)
        elif text != SCORE_LABEL:
            page.lines.append(text)


def parse_page(html: str) -> Page:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser.page


# --- The session -------------------------------------------------------------------------------------------------


@dataclass
class _Place:
    """Where the agent is: the state WebShop's URLs carry."""

    kind: str = "start"  # start | results | item | sub_page | done
    query: str = ""
    page_number: int = 1
    asin: str = ""
    options: dict[str, str] = field(default_factory=dict)
    sub_page: str = ""


class WebShopSession:
    """A GameSession that shops on a WebShop server over HTTP; it holds no server-side state of its own."""

    def __init__(self, family: WebShopFamily) -> None:
        self.family = family
        self._task: Task | None = None
        self._session_id = ""
        self._place = _Place()
        self._page: Page | None = None

    def _url(self, place: _Place) -> str:
        base, session = self.family.options.url.rstrip("/"), self._session_id
        query, options, asin = (quote(text, safe="") for text in (place.query, repr(place.options), place.asin))
        return {
            "start": f"{base}/{session}",
            "results": f"{base}/search_results/{session}/{query}/{place.page_number}",
            "item": f"{base}/item_page/{session}/{asin}/{query}/{place.page_number}/{options}",
            "sub_page": f"{base}/item_sub_page/{session}/{asin}/{query}/{place.page_number}/{place.sub_page}/{options}",
            "done": f"{base}/done/{session}/{asin}/{options}",
        }[place.kind]

    def _go(self, place: _Place) -> Page:
        url = self._url(place)
        try:
            with urllib.request.urlopen(url, timeout=self.family.env.step_timeout_s) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            hint = (f"; does it hold goal {self._task.seed if self._task else '?'} (env.webshop.goal_count = "
                    f"{self.family.options.goal_count})?" if place.kind == "start" else "")
            raise EnvError(f"the WebShop server answered {error.code} to {url}{hint}") from None
        except (urllib.error.URLError, OSError) as error:
            raise EnvError(f"no answer from the WebShop server for {url}: {error}") from None
        page = parse_page(text)
        if not page.instruction and place.kind != "done":
            raise EnvError(f"{url} did not return a WebShop page (no #instruction-text)")
        if place.kind == "done" and page.score is None:
            raise EnvError(f"{url} did not report a purchase score ({SCORE_LABEL!r})")
        self._place, self._page = place, page
        return page

    def reset(self, task: Task) -> str:
        self.family.check_task(task)
        self._task, self._session_id = task, f"fixed_{secrets.token_hex(6)}_{task.seed}"
        page = self._go(_Place())
        return "\n".join([f"Instruction: {page.instruction}", *page.lines])

    def step(self, action: str) -> StepResult:
        if self._page is None or self._place.kind == "done":
            raise RuntimeError("step() needs a running game: call reset(task) first")
        parsed = _ACTION.fullmatch(action.strip())
        if parsed is None:
            return self._unchanged(f"Invalid action {action!r}: write search[keywords] or click[label].")
        verb, argument = parsed.group(1), parsed.group(2).strip()
        if verb == "search":
            return self._search(argument)
        label = self._page.clickables.get(argument.lower())
        if label is None or label.lower() == "search":
            return self._unchanged(f"There is no {argument!r} to click on this page.")
        return self._click(label)

    def _unchanged(self, message: str) -> StepResult:
        return StepResult(message, 0.0, False, False, 0.0)

    def _search(self, keywords: str) -> StepResult:
        assert self._page is not None
        if not self._page.has_search:
            return self._unchanged("There is no search box on this page; click[Back to Search] first.")
        # "/" would split WebShop's URL path and a leading "[" is read as a list literal: both become spaces.
        query = " ".join(re.sub(r"[/\\\[\]]", " ", keywords).lower().split())
        if not query:
            return self._unchanged("search[...] needs keywords.")
        return self._show(_Place("results", query=query))

    def _click(self, label: str) -> StepResult:
        assert self._page is not None
        here = self._place
        if label == BUY:
            page = self._go(_Place("done", here.query, here.page_number, here.asin, dict(here.options)))
            assert page.score is not None
            return StepResult(f"You bought the product. {SCORE_LABEL}: {page.score}", page.score, True,
                              math.isclose(page.score, 1.0), page.score)
        if label == BACK:
            return self._show(_Place())
        if label in (NEXT, PREV) and here.kind == "results":
            step = 1 if label == NEXT else -1
            return self._show(_Place("results", here.query, max(here.page_number + step, 1)))
        if label == PREV and here.kind == "item":
            return self._show(_Place("results", here.query, here.page_number))
        if label == PREV and here.kind == "sub_page":
            return self._show(_Place("item", here.query, here.page_number, here.asin, dict(here.options)))
        if label in SUB_PAGES and here.kind == "item":
            return self._show(_Place("sub_page", here.query, here.page_number, here.asin, dict(here.options), label))
        if here.kind == "results":  # a product id
            return self._show(_Place("item", here.query, here.page_number, label))
        if label in self._page.option_groups and here.kind == "item":
            options = {**here.options, self._page.option_groups[label]: label}
            self._go(_Place("item", here.query, here.page_number, here.asin, options))
            return StepResult(f"You have clicked {label}.", 0.0, False, False, 0.0)
        return self._unchanged(f"Clicking {label!r} does nothing here.")

    def _show(self, place: _Place) -> StepResult:
        page = self._go(place)
        return StepResult("\n".join(page.lines), 0.0, False, False, 0.0)

    def admissible_commands(self) -> list[str] | None:
        if self._page is None:
            raise RuntimeError("admissible_commands() needs a game: call reset(task) first")
        if self._page.has_search:
            return None  # any search[keywords] is allowed here
        return [f"click[{label}]" for label in self._page.clickables.values()]

    def close(self) -> None:
        """Nothing to release: every request is its own connection."""
        self._page = None


# --- The family --------------------------------------------------------------------------------------------------


class WebShopFamily(EnvFamily):
    name = "webshop"
    description = "WebShop: find and buy the product an instruction describes on a shopping site (your server)"
    default_system_prompt = format_prompt(
        "You are shopping on WebShop for the product the instruction describes. Commands: search[keywords] on the "
        "search page; click[label] for anything shown in brackets on the page: a product id in the results, an "
        "option such as a size or color, Description, Features, Reviews, < Prev, Next >, Back to Search. Choose "
        "the options the instruction asks for, then click[Buy Now]; the purchase ends the episode and is scored "
        "by how well product, options and price match.")
    noop_action = "click[Nothing]"  # clicks nothing: WebShop leaves the page as it is

    def __init__(self, env: EnvConfig) -> None:
        super().__init__(env)
        self.options: WebShopOptions = env.webshop

    @classmethod
    def availability(cls, env: EnvConfig) -> Availability:
        url = f"{env.webshop.url.rstrip('/')}/fixed_0"
        try:
            with urllib.request.urlopen(url, timeout=_PROBE_TIMEOUT_S) as response:
                page = parse_page(response.read().decode("utf-8", errors="replace"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            return Availability(Status.NEEDS_SERVER, f"no WebShop server answers at {env.webshop.url} ({error})",
                                _START)
        if not page.instruction or not page.has_search:
            return Availability(Status.NEEDS_SERVER, f"{url} answers but is not WebShop's search page", _START)
        return Availability(Status.AVAILABLE, f"WebShop server at {env.webshop.url}")

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def goal_range(self, split: str) -> range:
        """Goal numbers of a split: WebShop's baselines test on goals 0-499 and validate on 500-1499."""
        test, heldout, count = self.options.test_goals, self.options.heldout_goals, self.options.goal_count
        ranges = {TEST: range(0, test), HELDOUT: range(test, test + heldout), TRAIN: range(test + heldout, count)}
        if split not in ranges:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(SPLITS)}")
        return ranges[split]

    def task_count(self, split: str) -> int:
        return len(self.goal_range(split))

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        goals = self.goal_range(split)[start:start + count]
        return [Task(task_id=f"{self.name}/{split}/{goal:05d}", family=self.name, task_type="shopping", split=split,
                     seed=goal) for goal in goals]

    def check_task(self, task: Task) -> None:
        if task.family != self.name or task.split not in SPLITS or task.seed not in self.goal_range(task.split):
            raise ValueError(f"task {task.task_id} ({task.family}/{task.split}) is not a {self.name} task")

    def open_session(self) -> WebShopSession:
        return WebShopSession(self)

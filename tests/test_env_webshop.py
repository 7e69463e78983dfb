"""The WebShop family, played over HTTP against the WebShop-compatible test server (tests/webshop_server.py) on
127.0.0.1, with a catalogue generated here; sessions run in worker processes as in a rollout."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from webshop_server import Catalogue, WebShopServer, make_catalogue, purchase_reward, token_set_ratio

from dypo.stages.config import EnvConfig, WebShopOptions
from dypo.stages.environments import EnvError, EnvPool, Status, get_family
from dypo.stages.environments.webshop import WebShopFamily, parse_page
from dypo.stages.trajectory import Task


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return make_catalogue(seed=7, products=60, goals=40)


@pytest.fixture(scope="module")
def server(catalogue: Catalogue) -> Iterator[WebShopServer]:
    with WebShopServer(catalogue) as server:
        yield server


def webshop_env(url: str, **options: object) -> EnvConfig:
    return EnvConfig(family="webshop", max_turns=8, step_timeout_s=10,
                     webshop=WebShopOptions(**{"url": url, "goal_count": 40, "test_goals": 5, "heldout_goals": 5,
                                               **options}))


@pytest.fixture(scope="module")
def pool(server: WebShopServer) -> Iterator[EnvPool]:
    with EnvPool(webshop_env(server.url), size=2) as pool:
        yield pool


def winning_actions(catalogue: Catalogue, task: Task) -> list[str]:
    """Search for the goal's product type, open the goal's product, choose the goal's options, buy."""
    goal = catalogue.goals[task.seed]
    product = catalogue.products[goal.asin]
    return [f"search[{' '.join(goal.attributes)} {product.query}]", f"click[{goal.asin}]",
            *(f"click[{value}]" for value in goal.options.values()), "click[Buy Now]"]


def test_splits_follow_webshops_goal_numbering(server: WebShopServer) -> None:
    family = get_family(webshop_env(server.url))
    assert [family.task_count(split) for split in ("train", "heldout", "test")] == [30, 5, 5]
    train = family.make_tasks("train", 30)
    assert (train[0].task_id, train[0].seed, train[-1].seed) == ("webshop/train/00010", 10, 39)
    assert [t.seed for t in family.make_tasks("test", 5)] == [0, 1, 2, 3, 4]
    assert [t.seed for t in family.make_tasks("heldout", 2, start=3)] == [8, 9]
    with pytest.raises(ValueError, match="the heldout split has 5 webshop games"):
        family.make_tasks("heldout", 1, start=5)
    with pytest.raises(ValueError, match="no split 'dev'"):
        family.task_count("dev")
    with pytest.raises(ValueError, match=r"test_goals \+ heldout_goals \(1500\) must be less than goal_count \(40\)"):
        WebShopOptions(goal_count=40)
    with pytest.raises(ValueError, match="url must start with http"):
        WebShopOptions(url="127.0.0.1:3000")
    assert not WebShopFamily.has_expert


def test_buying_the_goal_product_with_its_options_wins(pool: EnvPool, catalogue: Catalogue,
                                                       server: WebShopServer) -> None:
    family = get_family(pool.env)
    session = pool.sessions(1)[0]
    for task in family.make_tasks("train", 3) + family.make_tasks("test", 1):
        observation = session.reset(task)
        assert observation.startswith(f"Instruction: {catalogue.goals[task.seed].instruction}\n")
        assert session.admissible_commands() is None  # the search page: any search[...] goes
        for action in winning_actions(catalogue, task):
            if session.admissible_commands() is not None:
                assert action in session.admissible_commands(), action
            result = session.step(action)
        assert (result.done, result.won, result.score, result.reward) == (True, True, 1.0, 1.0)
        assert result.observation == "You bought the product. Your score (min 0.0, max 1.0): 1.0"
        session_id, asin, _, _ = server.purchases[-1]
        assert session_id.startswith("fixed_") and session_id.endswith(f"_{task.seed}")
        assert asin == catalogue.goals[task.seed].asin


def test_a_purchase_is_scored_by_attributes_options_and_price(pool: EnvPool, catalogue: Catalogue) -> None:
    family = get_family(pool.env)
    task = family.make_tasks("train", 1, start=5)[0]
    goal = catalogue.goals[task.seed]
    session = pool.sessions(1)[0]
    session.reset(task)
    for action in winning_actions(catalogue, task)[:2]:
        session.step(action)
    result = session.step("click[Buy Now]")  # no option chosen
    expected = (len(goal.attributes) + 0 + 1) / (len(goal.attributes) + len(goal.options) + 1)
    assert (result.done, result.won) == (True, False) and result.score == pytest.approx(expected)
    other_kind = next(p for p in catalogue.products.values() if p.query != catalogue.products[goal.asin].query
                      and p.category != catalogue.products[goal.asin].category)
    assert purchase_reward(catalogue, goal, other_kind.asin, goal.options) == 0.0  # another type of product
    assert token_set_ratio("navy blue", "blue navy") == 100 and token_set_ratio("small", "x-large") < 85


def test_pages_navigate_like_webshop(pool: EnvPool, catalogue: Catalogue) -> None:
    session = pool.sessions(1)[0]
    task = get_family(pool.env).make_tasks("train", 1, start=2)[0]
    session.reset(task)
    query = catalogue.products[catalogue.goals[task.seed].asin].query
    assert session.step("click[Buy Now]").observation == "There is no 'Buy Now' to click on this page."
    assert session.step("buy it").observation.startswith("Invalid action 'buy it'")
    assert session.step("search[ / ]").observation == "search[...] needs keywords."
    results = session.step(f"search[{query}]").observation
    assert results.startswith("[Back to Search]\nPage 1 (Total results: ")
    assert session.step("search[more]").observation.startswith("There is no search box on this page")
    page_two = session.step("click[next >]").observation  # labels match case-insensitively
    assert page_two.startswith("[Back to Search]\nPage 2") and "[< Prev]" in page_two
    assert session.step("click[< Prev]").observation == results
    first = results.splitlines()[3].strip("[]")
    item = session.step(f"click[{first.lower()}]").observation
    assert "[Buy Now]" in item and "[Description]" in item
    features = session.step("click[Features]").observation
    assert features.startswith("[Back to Search]\n[< Prev]\n") and "[Buy Now]" not in features
    assert session.step("click[< Prev]").observation == item
    assert session.step("click[< Prev]").observation == results
    start = session.step("click[Back to Search]")
    assert start.observation == "WebShop\n[Search]" and session.admissible_commands() is None
    assert not start.done


def test_random_play_ends_within_max_turns(pool: EnvPool) -> None:
    rng = random.Random(0)
    session = pool.sessions(1)[0]
    family = get_family(pool.env)
    for task in family.make_tasks("heldout", 3):
        session.reset(task)
        for steps in range(1, pool.env.max_turns + 1):  # noqa: B007 - the count is checked below
            commands = session.admissible_commands() or [f"search[{rng.choice(['tea', 'socks', 'red lotion'])}]"]
            result = session.step(rng.choice(commands))
            assert 0.0 <= result.score <= 1.0 and result.observation
            if result.done:
                break
        assert steps <= pool.env.max_turns


def test_group_members_start_identically_and_do_not_share_state(pool: EnvPool, catalogue: Catalogue,
                                                                server: WebShopServer) -> None:
    """Episodes of one goal are separate WebShop sessions of that goal; neither sees the other's state."""
    task = get_family(pool.env).make_tasks("train", 1, start=7)[0]
    first, second = pool.sessions(2)
    assert first.reset(task) == second.reset(task)
    actions = winning_actions(catalogue, task)
    first.step(actions[0])
    first.step(actions[1])  # first is on the product page now; second is still on the search page
    assert second.admissible_commands() is None
    assert second.step("click[Buy Now]").observation == "There is no 'Buy Now' to click on this page."
    results = [second.step(action) for action in actions][-1], [first.step(action) for action in actions[2:]][-1]
    assert all(result.won for result in results)
    assert server.purchases[-1][0] != server.purchases[-2][0]


def test_the_parser_reads_webshop_markup() -> None:
    page = parse_page(
        '<html><head><title>t</title><link rel="x"></head><body><div id="instruction-text"><h4>Instruction:<br>'
        'buy tea</h4></div><form><button class="btn">Back to Search</button></form>'
        '<h4 class="product-asin"><a class="product-link" href="/x">B01</a></h5><h4>Green Tea</h4>'
        '<h4>size</h4><input type="radio" id="radio_size0" name="size" value="1 lb"><label for="radio_size0">1 lb'
        '</label><div style="display: none"><pre>goal: B01</pre></div><h4 hidden>secret</h4>'
        '<h3 id="reward">Your score (min 0.0, max 1.0)<pre>0.75</pre></h3><script>var x = 1;</script></body></html>')
    assert page.instruction == "buy tea" and not page.has_search and page.score == 0.75
    assert page.lines == ["[Back to Search]", "[B01]", "Green Tea", "size: [1 lb]"]
    assert page.clickables == {"back to search": "Back to Search", "b01": "B01", "1 lb": "1 lb"}
    assert page.option_groups == {"1 lb": "size"}


def test_availability_needs_a_webshop_server(server: WebShopServer, tmp_path: Path) -> None:
    assert WebShopFamily.availability(webshop_env(server.url)).status == Status.AVAILABLE
    closed = WebShopFamily.availability(webshop_env("http://127.0.0.1:9"))
    assert closed.status == Status.NEEDS_SERVER and "no WebShop server answers at http://127.0.0.1:9" in closed.detail
    assert "python -m web_agent_site.app" in closed.enable
    (tmp_path / "fixed_0").write_text("<html><body>a file server</body></html>")
    other = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=tmp_path))
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        found = WebShopFamily.availability(webshop_env(f"http://127.0.0.1:{other.server_address[1]}"))
        assert found.status == Status.NEEDS_SERVER and "answers but is not WebShop's search page" in found.detail
    finally:
        other.shutdown()
        other.server_close()


def test_server_failures_are_env_errors(catalogue: Catalogue) -> None:
    with WebShopServer(catalogue) as server:
        env = webshop_env(server.url, goal_count=100)  # more goals than the server holds
        family = get_family(env)
        session = family.open_session()
        with pytest.raises(EnvError, match=r"answered 404 .* does it hold goal 50 \(env\.webshop\.goal_count = 100\)"):
            session.reset(family.make_tasks("train", 1, start=40)[0])
        session.reset(family.make_tasks("train", 1)[0])
    with pytest.raises(EnvError, match="no answer from the WebShop server"):
        session.step("search[tea]")
    with pytest.raises(ValueError, match="is not a webshop task"):
        session.reset(Task("webshop/test/00001", "webshop", "shopping", "test", 7))
    with pytest.raises(NotImplementedError, match="webshop has no expert"):
        family.expert_turns(family.make_tasks("train", 1)[0], session)

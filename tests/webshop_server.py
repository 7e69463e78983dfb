"""A small WebShop-compatible server for the tests, over a catalogue the tests generate.

It answers the routes of WebShop's Flask app (`web_agent_site/app.py`) with pages of the same structure (the
instruction in `#instruction-text`, buttons of class `btn`, result links of class `product-link`, options as radio
inputs with labels, the score after "Your score (min 0.0, max 1.0)"), and scores a purchase with WebShop's formula
(`web_agent_site/engine/goal.py`):

    reward = r_type * (attributes matched + options matched + [price <= goal's upper bound])
                    / (goal attributes + goal options + 1)

where an attribute or option matches when its fuzzy token-set similarity to one of the product's exceeds 85 (an
attribute also matches when it appears in the title, features or description), and r_type scales the whole down
when the product is of another type (1, or 0.5 / 0.1 / 0 as the titles' nouns overlap less). WebShop finds the
nouns with spaCy; this server has no language model, so a title's nouns are the words the catalogue generator put
in it as product types. Search ranks by shared words instead of WebShop's BM25 index. Only sessions whose id contains
"fixed" exist, with the goal the id ends with, as in WebShop (which gives other session ids a random goal).
"""

from __future__ import annotations

import ast
import html
import random
import threading
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote

RESULTS, PER_PAGE = 50, 10  # WebShop's SEARCH_RETURN_N and PRODUCT_WINDOW
PRICE_RANGE = [10.0 * i for i in range(1, 100)]  # WebShop's price bounds for goals
SCORE_LABEL = "Your score (min 0.0, max 1.0)"

# category -> (product types, attributes, options); every product of a category draws from these.
_KINDS: dict[str, tuple[list[str], list[str], dict[str, list[str]]]] = {
    "beauty": (["shampoo", "deodorant", "lotion", "conditioner"],
               ["paraben free", "sulfate free", "sensitive skin", "long lasting", "natural ingredients"],
               {"scent": ["lavender", "bright citrus", "vanilla", "unscented"], "size": ["3 ounce", "8 ounce"]}),
    "fashion": (["hoodie", "sneakers", "socks", "jacket"],
                ["machine wash", "slim fit", "cotton", "long sleeve", "non slip"],
                {"color": ["black", "navy blue", "red", "white"], "size": ["small", "medium", "large"]}),
    "grocery": (["coffee", "tea", "granola", "chocolate"],
                ["gluten free", "sugar free", "organic", "low calorie", "non gmo"],
                {"flavor": ["caramel", "mint", "original"], "size": ["pack of 2", "pack of 6"]}),
}
_BRANDS = ["Acme", "Northwind", "Bluebird", "Evergreen", "Sunpeak", "Riverstone"]


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    category: str
    query: str  # the search query WebShop scraped the product for; here its type
    product_category: str  # "beauty › personal care › deodorant"
    nouns: frozenset[str]  # the title's product-type words (WebShop: the title's nouns, by spaCy)
    attributes: tuple[str, ...]
    options: dict[str, list[str]]
    price: float
    features: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class Goal:
    asin: str  # the product the instruction was written from
    instruction: str
    attributes: tuple[str, ...]
    options: dict[str, str]
    price_upper: float


@dataclass
class Catalogue:
    products: dict[str, Product] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)


def make_catalogue(seed: int, products: int = 60, goals: int = 40) -> Catalogue:
    """Products with attributes, options and prices, and shuffled goals written from them, all from `seed`."""
    rng = random.Random(seed)
    catalogue = Catalogue()
    while len(catalogue.products) < products:
        category = rng.choice(sorted(_KINDS))
        types, attributes, options = _KINDS[category]
        kind, brand = rng.choice(types), rng.choice(_BRANDS)
        chosen = tuple(rng.sample(attributes, 3))
        asin = "B0" + "".join(rng.choices("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", k=8))
        catalogue.products[asin] = Product(
            asin=asin, title=f"{brand} {kind.title()}, {chosen[0].title()}, {chosen[1]}", category=category,
            query=kind, product_category=f"{category} › {kind}s › {brand.lower()}", nouns=frozenset({kind}),
            attributes=chosen, options={name: rng.sample(values, len(values)) for name, values in options.items()},
            price=round(rng.uniform(5, 80), 2), features=(f"{chosen[2]} {kind}", f"made by {brand}"),
            description=f"A {kind} from {brand}, {chosen[0]} and {chosen[1]}.")
    listed = list(catalogue.products.values())
    for _ in range(goals):
        product = rng.choice(listed)
        wanted = tuple(rng.sample(product.attributes[:2], rng.randint(1, 2)))
        picks = {name: rng.choice(values) for name, values in product.options.items()}
        upper = max(rng.sample([p for p in PRICE_RANGE if p > product.price][:4], 2))
        text = (f"i need a {' and '.join(wanted)} {product.query} with "
                + ", and ".join(f"{name}: {value}" for name, value in picks.items())
                + f", and price lower than {upper:.2f} dollars")
        catalogue.goals.append(Goal(product.asin, text, wanted, picks, upper))
    return catalogue


# --- WebShop's reward --------------------------------------------------------------------------------------------


def token_set_ratio(a: str, b: str) -> int:
    """The fuzzy token-set similarity (0-100) WebShop takes from thefuzz: word sets compared, order ignored."""
    left, right = set(a.lower().split()), set(b.lower().split())
    common = " ".join(sorted(left & right))
    with_left = f"{common} {' '.join(sorted(left - right))}".strip()
    with_right = f"{common} {' '.join(sorted(right - left))}".strip()
    pairs = ((common, with_left), (common, with_right), (with_left, with_right))
    return max(round(100 * SequenceMatcher(None, x, y).ratio()) if x and y else 0 for x, y in pairs)


def type_reward(product: Product, goal_product: Product) -> float:
    query_match = product.query == goal_product.query
    levels = {level.strip() for level in product.product_category.split("›")}
    category_match = len(levels & {level.strip() for level in goal_product.product_category.split("›")}) >= 2
    title_score = len(product.nouns & goal_product.nouns) / len(goal_product.nouns)
    if title_score == 0:
        return 0.0
    if title_score < 0.1:
        return 0.1
    return 1.0 if query_match or category_match or title_score > 0.2 else 0.5


def purchase_reward(catalogue: Catalogue, goal: Goal, asin: str, options: dict[str, str]) -> float:
    product = catalogue.products[asin]
    text = " ".join((product.title, *product.features, product.description)).lower()
    attributes = sum(any(token_set_ratio(have, want) > 85 for have in product.attributes) or want in text
                     for want in goal.attributes)
    matched_options = sum(any(token_set_ratio(have, want) > 85 for have in options.values())
                          for want in goal.options.values())
    price = product.price <= goal.price_upper
    total = (attributes + matched_options + price) / (len(goal.attributes) + len(goal.options) + 1)
    return total * type_reward(product, catalogue.products[goal.asin])


def search(catalogue: Catalogue, keywords: str) -> list[Product]:
    words = set(keywords.lower().split())

    def overlap(product: Product) -> int:
        return len(words & set(" ".join((product.title, product.query, *product.attributes)).lower().split()))

    ranked = sorted((p for p in catalogue.products.values() if overlap(p)), key=overlap, reverse=True)
    return ranked[:RESULTS]


# --- Pages -------------------------------------------------------------------------------------------------------


def _button(action: str, label: str, css: str = "btn btn-primary") -> str:
    return (f'<form method="post" action="{action}"><button type="submit" class="{css}">{html.escape(label)}'
            "</button></form>")


def _page(session: str, instruction: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><title>WebShop</title></head><body>"
            f'<div id="instruction-text" class="text-center"><h4>Instruction:<br>{html.escape(instruction)}</h4></div>'
            f"{body}</body></html>")


class _Handler(BaseHTTPRequestHandler):
    server: WebShopServer

    def log_message(self, format: str, *args: object) -> None:  # quiet: tests read results, not access logs
        return

    def do_POST(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = [unquote(part) for part in self.path.strip("/").split("/")]
        try:
            status, body = 200, self.server.render(parts)
        except LookupError as error:
            status, body = 404, f"<html><body><p>{html.escape(str(error))}</p></body></html>"
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class WebShopServer(ThreadingHTTPServer):
    """Serves `catalogue` on 127.0.0.1 from a background thread; `url` is its base URL, `purchases` its log."""

    daemon_threads = True

    def __init__(self, catalogue: Catalogue) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.catalogue = catalogue
        self.purchases: list[tuple[str, str, dict[str, str], float]] = []  # session, asin, options, reward
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> WebShopServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def goal(self, session: str) -> Goal:
        index = session.rsplit("_", 1)[-1]
        if "fixed" not in session or not index.isdigit() or int(index) >= len(self.catalogue.goals):
            raise LookupError(f"no session {session!r}: this server has goals 0 to {len(self.catalogue.goals) - 1}")
        return self.catalogue.goals[int(index)]

    def product(self, asin: str) -> Product:
        if asin.upper() not in self.catalogue.products:
            raise LookupError(f"no product {asin!r}")
        return self.catalogue.products[asin.upper()]

    def render(self, parts: list[str]) -> str:
        route, args = (parts[0], parts[1:]) if len(parts) > 1 else ("index", parts)
        goal = self.goal(args[0])
        session, text = args[0], goal.instruction
        if route == "index":
            return _page(session, text, '<div id="logo"><h2>WebShop</h2></div><form method="post">'
                         '<input id="search_input" type="text" name="search_query">'
                         '<button type="submit" class="btn btn-success">Search</button></form>')
        back = _button(f"/{session}", "Back to Search", "btn btn-success")
        if route == "search_results":
            keywords, page = args[1], int(args[2])
            words = " ".join(ast.literal_eval(keywords)) if keywords.startswith("[") else keywords
            found = search(self.catalogue, words)
            listing = "".join(
                f'<div><h4><a class="product-link" href="/item_page/{session}/{p.asin}/{quote(keywords)}/{page}/'
                f'{quote("{}")}">{p.asin}</a></h4><h4 class="product-title">{html.escape(p.title)}</h4>'
                f'<h5 class="product-price">${p.price}</h5></div>'
                for p in found[(page - 1) * PER_PAGE:page * PER_PAGE])
            paging = (_button("#", "< Prev") if page > 1 else "") + _button("#", "Next >")
            return _page(session, text, f"{back}<h3>Page {page} (Total results: {len(found)})</h3>{paging}{listing}")
        product = self.product(args[1])
        if route == "done":
            options = ast.literal_eval(args[2])
            reward = purchase_reward(self.catalogue, goal, product.asin, options)
            self.purchases.append((session, product.asin, options, reward))
            return _page(session, text, f'<h1>Thank you for shopping with us!</h1><div style="display:none">'
                         f"<pre>{html.escape(str(goal))}</pre></div>"
                         f'<h3 id="reward">{SCORE_LABEL}<pre>{reward}</pre></h3>')
        prev = _button("#", "< Prev")
        if route == "item_sub_page":
            sub_page = args[4]
            content = {"Description": f"<p>{html.escape(product.description)}</p>",
                       "Features": "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in product.features) + "</ul>",
                       "Reviews": "", "Attributes": "".join(f"<p>{a}</p>" for a in product.attributes)}[sub_page]
            return _page(session, text, f"{back}{prev}{content}")
        if route != "item_page":
            raise LookupError(f"no route {route!r}")
        radios = "".join(
            f"<h4>{name}</h4>" + "".join(
                f'<input type="radio" id="radio_{name}{i}" name="{name}" value="{html.escape(value)}">'
                f'<label for="radio_{name}{i}">{html.escape(value)}</label>' for i, value in enumerate(values))
            for name, values in product.options.items())
        buttons = "".join(_button("#", label) for label in ("Description", "Features", "Reviews"))
        return _page(session, text, f"{back}{prev}{radios}<h2>{html.escape(product.title)}</h2>"
                     f"<h4>Price: ${product.price}</h4><h4>Rating: N.A.</h4>{buttons}"
                     f'{_button("#", "Buy Now", "btn btn-lg purchase")}')

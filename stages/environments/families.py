"""Which module serves each `env.family`: adding an environment is one module, one entry here and one options
section in `EnvConfig`.

Modules are imported on first use, so a machine without, say, the `alfworld` package still runs every other
family, and `dypo envs list` can say what is missing instead of failing to import.
"""

from __future__ import annotations

import importlib
import typing

from dypo.stages.config import EnvConfig
from dypo.stages.environments.protocol import Availability, EnvFamily, Status

# env.family -> "module:class"
FAMILIES: dict[str, str] = {
    "twx-coin": "dypo.stages.environments.twx:CoinFamily",
    "twx-cookingworld": "dypo.stages.environments.twx:CookingWorldFamily",
    "twx-twc": "dypo.stages.environments.twx:TwcFamily",
    "twx-mapreader": "dypo.stages.environments.twx:MapReaderFamily",
    "twx-sorting": "dypo.stages.environments.twx:SortingFamily",
    "twx-arithmetic": "dypo.stages.environments.twx:ArithmeticFamily",
    "alfworld": "dypo.stages.environments.alfworld:OfficialFamily",
    "alfworld-generated": "dypo.stages.environments.alfworld:GeneratedFamily",
    "textworld-coin": "dypo.stages.environments.textworld_games:CoinFamily",
    "textworld-treasure": "dypo.stages.environments.textworld_games:TreasureFamily",
    "textworld-cooking": "dypo.stages.environments.textworld_games:CookingFamily",
    "scienceworld": "dypo.stages.environments.scienceworld:ScienceWorldFamily",
    "webshop": "dypo.stages.environments.webshop:WebShopFamily",
}


def family_class(name: str) -> type[EnvFamily]:
    if name not in FAMILIES:
        raise ValueError(f"unknown env.family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    module, _, cls = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_family(env: EnvConfig) -> EnvFamily:
    """The family object for a config (cheap: engines start only when sessions open)."""
    return family_class(env.family)(env)


def configurable_families() -> list[str]:
    """The names `EnvConfig.family` accepts; a test keeps them equal to FAMILIES."""
    return list(typing.get_args(EnvConfig.model_fields["family"].annotation))


def family_availability(name: str, env: EnvConfig) -> Availability:
    """Whether a registered family can run here; a module that does not even import is reported, not raised."""
    try:
        cls = family_class(name)
    except ImportError as error:
        return Availability(Status.NOT_INSTALLED, f"cannot import {FAMILIES[name].partition(':')[0]}: {error}",
                            "install the package the error names")
    return cls.availability(env)


"""DyPO: on-policy multi-turn RL post-training for LLM agents."""

import os
from importlib.metadata import version

__version__ = version("dypo")


def code_version() -> str:
    """The code identity recorded in manifests and digests; images set DYPO_CODE_VERSION to their build id."""
    return os.environ.get("DYPO_CODE_VERSION", __version__)

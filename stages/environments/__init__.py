"""The environment layer (DESIGN.md §5): game families behind one protocol, played in worker processes.

- `protocol`: what a family and a game session are (`EnvFamily`, `GameSession`, `StepResult`, errors).
- `families`: which module serves each `env.family`, imported on first use.
- `pool`: sessions in worker processes, so one crashing or hanging game loses one episode.
- one module per family: `twx` (TextWorldExpress), …
"""

from dypo.stages.environments.families import get_family
from dypo.stages.environments.pool import EnvPool
from dypo.stages.environments.protocol import (
    HELDOUT,
    TRAIN,
    Availability,
    EnvError,
    EnvFamily,
    EnvTimeout,
    ExpertTurn,
    GameSession,
    Status,
    StepResult,
)

__all__ = [
    "HELDOUT",
    "TRAIN",
    "Availability",
    "EnvError",
    "EnvFamily",
    "EnvPool",
    "EnvTimeout",
    "ExpertTurn",
    "GameSession",
    "Status",
    "StepResult",
    "get_family",
]

"""Stage `publish`: register the iteration's checkpoint in the MLflow model registry as the `candidate`."""

from __future__ import annotations

from dypo.stages import tracking
from dypo.stages.commit import StageOutcome, commit_stage, input_digest
from dypo.stages.context import RunContext


def publish(ctx: RunContext, iteration: int, force: bool = False) -> StageOutcome:
    policy, checkpoint_key = ctx.checkpoint(iteration)
    digest = input_digest("publish", ctx.config.section("publish", "tracking"), [policy], {"iteration": iteration})

    def body(writer):
        source = ctx.store.uri_of(checkpoint_key)
        version = tracking.register_checkpoint(ctx, source, iteration)
        writer.details.update({"registry_name": ctx.config.publish.model_name, "version": version,
                               "alias": tracking.CANDIDATE, "source": source})
        writer.metrics["model_version"] = float(version)

    return commit_stage(ctx.store, "publish", iteration, digest, [policy], force, body)

"""The project's Prefect automation: retrain on evidence.

When the drift check (flows/monitoring.py) finds a threshold passed it emits
``mnist.monitoring.retrain-requested`` about the resource ``mnist.model.<model name>``. This
automation answers each such event with a run of ``monitor.retrain_deployment``
(``mnist-training/manual``), passing the event's ``reason`` as the run's ``reason`` parameter,
which the training tags on its MLflow run and on the model version it registers.

Registered by ``make up`` (flows/deploy.py) after the deployments, under one name: registering
again replaces it, so a changed params.yaml never leaves two automations answering one event.
"""

from __future__ import annotations

from uuid import UUID

from flows.monitoring import RETRAIN, resource

NAME = "mnist-retrain-on-evidence"


def retrain_automation(deployment_id: UUID, model_name: str):
    """The automation (Prefect's AutomationCore): one retraining run per retrain event."""
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=NAME,
        description=(
            f"Retrain {model_name} when the drift check asks for it (data drift, prediction "
            "drift, low confidence or corrections past params.yaml's monitor thresholds)."
        ),
        trigger=EventTrigger(
            expect={RETRAIN},
            match={"prefect.resource.id": resource(model_name)["prefect.resource.id"]},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=deployment_id,
                parameters={"reason": "{{ event.payload.reason }}"},
            )
        ],
    )


def apply_automation(client, deployment_name: str, model_name: str) -> UUID:
    """Create the automation (replacing one of the same name) on ``client``'s server; its id."""
    deployment = client.read_deployment_by_name(deployment_name)
    for existing in client.read_automations_by_name(NAME):
        client.delete_automation(existing.id)
    return client.create_automation(retrain_automation(deployment.id, model_name))

"""Loading a model the training stage logged to MLflow."""

from __future__ import annotations

from keel.training.models import RiskModel


def load_risk_model(model_uri: str) -> RiskModel:
    """Load a model logged by the training stage from an MLflow URI (runs:/..., models:/...)."""
    from keel.tracking import load_logged_model

    return load_logged_model(model_uri)

from ablate.tracking.mlflow import MlflowTracker, NullTracker, Tracker, open_tracker, resolve_uri

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "open_tracker", "resolve_uri"]

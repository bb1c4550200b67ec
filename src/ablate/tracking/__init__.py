from ablate.tracking.mlflow import MlflowTracker, NullTracker, Tracker, open_tracker, resolve_uri
from ablate.tracking.store import check_store, check_writable, open_client

__all__ = ["MlflowTracker", "NullTracker", "Tracker", "check_store", "check_writable", "open_client", "open_tracker",
           "resolve_uri"]

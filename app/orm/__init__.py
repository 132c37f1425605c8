"""ORM models, one file per table."""

from app.orm.api_key import ApiKey
from app.orm.artifact import Artifact
from app.orm.dataset import Dataset
from app.orm.job import Job
from app.orm.job_event import JobEvent
from app.orm.model import MLModel
from app.orm.search import Search
from app.orm.search_trial import SearchTrial
from app.orm.tenant import Tenant
from app.orm.webhook_delivery import WebhookDelivery
from app.orm.webhook_secret import WebhookSecret
from worker.contract import JobStatus

__all__ = [
    "ApiKey",
    "Artifact",
    "Dataset",
    "Job",
    "JobEvent",
    "JobStatus",
    "MLModel",
    "Search",
    "SearchTrial",
    "Tenant",
    "WebhookDelivery",
    "WebhookSecret",
]

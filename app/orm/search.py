"""A search job's state (DESIGN §10): its phase, deadline, inputs and the step guard."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Search(Base):
    """One row per search job, beside its `job` row; the trials are `search_trial` rows.

    `phase` is `starting` (split and sensitivity analysis), `trials`, `finishing` or
    `done`. `stepping_at` is the guard of the step that asks the sampler for trials: set by
    a conditional UPDATE, so two steps never ask at once (a step that died holding it is
    overtaken once it is older than the step's lease). `token` is the claim the job's row
    was taken with: every task of the search records progress and the outcome under it.
    """

    __tablename__ = "search"

    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    token: Mapped[str] = mapped_column(String(200))
    phase: Mapped[str] = mapped_column(String(16), default="starting")
    deadline_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Object-store keys of the files every trial needs: the model, the search split and
    # the held-out split of the eval data, the other datasets.
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sensitivity: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    splits: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    stepping_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    steps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

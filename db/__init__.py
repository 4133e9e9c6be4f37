"""slidestream.db: the statistics database (SQLAlchemy 2 models, migrations, cohort queries)."""

from slidestream.db._engine import connect, mask_url
from slidestream.db._migrate import (
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    upgrade,
)
from slidestream.db._schema import (
    AnalysisRun,
    Base,
    ClassStatistics,
    PatientMetadata,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
)

__all__ = [
    "AnalysisRun",
    "Base",
    "ClassStatistics",
    "PatientMetadata",
    "QCFlag",
    "Slide",
    "SlideMetadata",
    "SlideStatistics",
    "check_schema",
    "connect",
    "current_revision",
    "downgrade",
    "head_revision",
    "mask_url",
    "open_database",
    "upgrade",
]

"""slidestream.db: the statistics database (SQLAlchemy 2 models, migrations, cohort queries).

Open a database with :func:`open_database` (``create=True`` creates the schema of a fresh
database), record runs with :func:`record_run` / :func:`record_failure` (results on disk not yet
recorded: :func:`record_if_missing`), import cohort metadata
with :func:`import_metadata_csv`, summarise with :func:`query_cohort` (typed:
:func:`summarise_cohort`) and list slides page by page with :func:`slide_page` or streamed with
:func:`iter_slides`. Every write and query
first checks that the schema is at the head revision (:func:`check_schema`). Connection URLs
are never logged with their password (:func:`mask_url`).
"""

from slidestream.db._engine import mask_url
from slidestream.db._metadata_import import (
    ImportReport,
    flag_slide,
    import_metadata,
    import_metadata_csv,
    unflag_slide,
)
from slidestream.db._migrate import (
    check_schema,
    connect,
    current_revision,
    downgrade,
    head_revision,
    open_database,
    upgrade,
)
from slidestream.db._query import (
    BUILTIN_COLUMNS,
    CLASS_METRICS,
    SLIDE_METRICS,
    SUMMARY_FIELDS,
    TYPE_METRICS,
    GroupValue,
    MetricSummary,
    query_cohort,
    query_cohort_df,
    summarise_cohort,
)
from slidestream.db._read import (
    RunOutcome,
    SlideValues,
    connect_read_only,
    latest_runs,
    query_slide_values,
    tissue_classes,
)
from slidestream.db._schema import (
    RUN_STATUSES,
    AnalysisRun,
    Base,
    ClassStatistics,
    PatientMetadata,
    QCFlag,
    Slide,
    SlideMetadata,
    SlideStatistics,
    TypeStatistics,
)
from slidestream.db._slide_table import (
    SlideTableRow,
    iter_slide_csv,
    iter_slide_table,
    slide_table_columns,
)
from slidestream.db._slides import (
    SLIDE_COLUMNS,
    SLIDE_SORT_KEYS,
    SLIDE_TYPE_COLUMNS,
    SlidePage,
    SlideRow,
    count_slides,
    iter_slides,
    list_slides,
    recorded_type_names,
    slide_page,
)
from slidestream.db._write import (
    SUMMARY_SCHEMA,
    record_failure,
    record_if_missing,
    record_run,
    record_skip,
)

__all__ = [
    "BUILTIN_COLUMNS",
    "CLASS_METRICS",
    "RUN_STATUSES",
    "SLIDE_COLUMNS",
    "SLIDE_METRICS",
    "SLIDE_SORT_KEYS",
    "SLIDE_TYPE_COLUMNS",
    "SUMMARY_FIELDS",
    "SUMMARY_SCHEMA",
    "TYPE_METRICS",
    "AnalysisRun",
    "Base",
    "ClassStatistics",
    "GroupValue",
    "ImportReport",
    "MetricSummary",
    "PatientMetadata",
    "QCFlag",
    "RunOutcome",
    "Slide",
    "SlideMetadata",
    "SlidePage",
    "SlideRow",
    "SlideStatistics",
    "SlideTableRow",
    "SlideValues",
    "TypeStatistics",
    "check_schema",
    "connect",
    "connect_read_only",
    "count_slides",
    "current_revision",
    "downgrade",
    "flag_slide",
    "head_revision",
    "import_metadata",
    "import_metadata_csv",
    "iter_slide_csv",
    "iter_slide_table",
    "iter_slides",
    "latest_runs",
    "list_slides",
    "mask_url",
    "open_database",
    "query_cohort",
    "query_cohort_df",
    "query_slide_values",
    "record_failure",
    "record_if_missing",
    "record_run",
    "record_skip",
    "recorded_type_names",
    "slide_page",
    "slide_table_columns",
    "summarise_cohort",
    "tissue_classes",
    "unflag_slide",
    "upgrade",
]

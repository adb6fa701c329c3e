"""Dataset importers: the authors' release format, MMRole and PCogAlignBench -> webdataset shards."""

from latent_mca.importers.cli import FORMATS, shards
from latent_mca.importers.common import ImportContext, ImportReport, RecordError

__all__ = ["FORMATS", "ImportContext", "ImportReport", "RecordError", "shards"]

"""Where the images come from: one ``Source`` per dataset behind one
interface (``base``), each in its own module, and the registry that picks
one for ``fields.dataset``.

Every source reads without network access unless ``download`` is True; a
dataset that is missing stops early with one sentence saying how to get it.
Adding a dataset: a line in ``catalog.FACTS`` for another TFDS builder, or a
new ``Source`` module and its line in ``_SOURCE_TYPES``.
"""

from __future__ import annotations

import ml_collections

from eqco_jax.data import catalog
from eqco_jax.data.catalog import DataFields
from eqco_jax.data.sources.base import DatasetInfo, EVAL_TEST, EVAL_TRAIN
from eqco_jax.data.sources.base import KeepList, PRETRAIN, ROLES, Source, Split
from eqco_jax.data.sources.digits import DigitsSource
from eqco_jax.data.sources.image_folder import ImageFolderSource
from eqco_jax.data.sources.tfds import TfdsSource

# Datasets read by something else than TfdsSource (the rest are TFDS builders).
_SOURCE_TYPES: dict[str, type[Source]] = {
    catalog.DIGITS: DigitsSource, catalog.IMAGE_FOLDER: ImageFolderSource}

__all__ = ["DatasetInfo", "DigitsSource", "EVAL_TEST", "EVAL_TRAIN",
           "ImageFolderSource", "KeepList", "PRETRAIN", "ROLES", "Source",
           "Split", "TfdsSource", "get_source"]


def get_source(fields: DataFields | ml_collections.ConfigDict, *,
               keep_list: KeepList | None = None) -> Source:
  """The source of ``fields.dataset`` (a config's data fields, or the config
  they are taken from); reads nothing yet.

  ``keep_list``: where lists of files are kept (None: listed anew by every
  source). Raises UserError (one sentence) if the dataset is not one of
  ``catalog.supported()``.
  """
  fields = DataFields.of(fields)
  facts = catalog.facts_of(fields.dataset)
  source_type = _SOURCE_TYPES.get(fields.dataset, TfdsSource)
  return source_type(fields.dataset, facts, fields, keep_list=keep_list)

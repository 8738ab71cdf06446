"""The daily loop's data generator: the loop dataset's own ``generator.py``, as this module.

The program that produces the loop's rows lives with its dataset (``source.path`` of the
folder whose ``dataset.yaml`` says ``loop: daily``); importing ``keel.generator`` runs that
file in place of this one (``keel.datasets.sources``), so the loop's stages, the stream and
the tests import it by one stable name.
"""

import sys

from keel.datasets.sources import generator_module
from keel.datasets.spec import loop_dataset

sys.modules[__name__] = generator_module(loop_dataset(), __name__)

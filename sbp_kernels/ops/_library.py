"""Makes sure the `sbp` op schemas exist: from the C++ extension when it loaded, else from Python."""
import torch

from .. import _extension  # noqa: F401  (loading _C declares the schemas)
from .._schemas import SCHEMAS

if _extension.loaded:
    lib = None
else:
    lib = torch.library.Library("sbp", "DEF")
    for schema in SCHEMAS.values():
        lib.define(schema)

"""Wire schemas of the API families loomlm serves, one module per family.

These modules are torch-free pydantic models: clients and tests can import
them without loading the engine.
"""

from __future__ import annotations

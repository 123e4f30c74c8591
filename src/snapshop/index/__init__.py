"""Vector indexes keyed by stable integer ids from the catalog."""

from snapshop.index.base import SearchHits, VectorIndex
from snapshop.index.factory import create_index, load_index, save_index
from snapshop.index.filtering import IdFilter

__all__ = ["IdFilter", "SearchHits", "VectorIndex", "create_index", "load_index", "save_index"]

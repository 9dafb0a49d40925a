"""The versioned checkpoint store: refs, versions and the store config (`base`), the local folder backend (`local`),
the Hugging Face Hub backend (`hub`); `open_store` picks one."""

from speechless.core.store.base import (
    VERSION_RE,
    StoreConfig,
    VersionInfo,
    is_store_ref,
    open_store,
    parse_ref,
    store_config,
)
from speechless.core.store.hub import HubStore
from speechless.core.store.local import LocalStore

__all__ = ["VERSION_RE", "HubStore", "LocalStore", "StoreConfig", "VersionInfo", "is_store_ref", "open_store",
           "parse_ref", "store_config"]

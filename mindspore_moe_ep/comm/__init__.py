"""Token exchange between the ranks of an expert-parallel group (CPU).

MindSpore's CPU backend has no all-to-all; this package provides one primitive, an
all-to-all-v of rows, over a shared-memory window (ranks of one host) or over AllGather
(any placement). See :mod:`.exchange` for the interface and :mod:`.window` for the window.
"""
from .exchange import AllGatherExchangeRows, ExchangeRows, make_exchange
from .window import CommWindow, CommWindowError, group_shares_memory, shared_memory_domain

__all__ = ["AllGatherExchangeRows", "CommWindow", "CommWindowError", "ExchangeRows",
           "group_shares_memory", "make_exchange", "shared_memory_domain"]

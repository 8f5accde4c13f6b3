"""The compound-scaling search (`effnet search`): find alpha, beta, gamma for your data and budget
on a small proxy network, as the paper's first step did on ImageNet."""

from effnet.search.grid import PAPER_COEFFICIENTS, Coefficients, coefficient_grid, spread_subset, within_constraint
from effnet.search.proxy import Proxy, measure
from effnet.search.runner import SearchResult, SearchSettings, search

__all__ = [
    "PAPER_COEFFICIENTS",
    "Coefficients",
    "Proxy",
    "SearchResult",
    "SearchSettings",
    "coefficient_grid",
    "measure",
    "search",
    "spread_subset",
    "within_constraint",
]

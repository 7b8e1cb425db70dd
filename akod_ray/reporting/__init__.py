"""Sample grids, plots and the Markdown report of a run or a sweep."""

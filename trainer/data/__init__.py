"""Event sources for bootstrapping, tests and studies: a synthetic generator and real data loaders."""

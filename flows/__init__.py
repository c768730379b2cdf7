"""The flows. Importing any of them makes explained failures read as their reason in
the run log (flows/support/explained.py)."""

from flows.support.explained import quiet_explained_failures

quiet_explained_failures()

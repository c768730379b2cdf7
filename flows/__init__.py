"""The flows. Importing any of them makes explained failures read as their reason in
the run log (flows/explained.py)."""

from flows.explained import quiet_explained_failures

quiet_explained_failures()

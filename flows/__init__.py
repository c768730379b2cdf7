"""The flows. Importing any of them makes explained failures read as their reason in
the run log (flows/support/explained.py), and stops the temporary Prefect server of a
run without PREFECT_API_URL when that run is killed (flows/support/temporary_server.py)."""

from flows.support.explained import quiet_explained_failures
from flows.support.temporary_server import stop_with_this_process

quiet_explained_failures()
stop_with_this_process()

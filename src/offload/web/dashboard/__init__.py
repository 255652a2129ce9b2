"""The dashboard: what runs, what failed and why, and the buttons that fix it.

`app.mount("/offload", jobs.dashboard(auth=BasicAuth("admin", "...")))`. See `pages.py` for
the pages and `access.py` for who may open them.
"""

from offload.web.dashboard.access import DashboardAuth as DashboardAuth
from offload.web.dashboard.pages import Dashboard as Dashboard
from offload.web.dashboard.pages import Operations as Operations
from offload.web.dashboard.pages import mounted_dashboards as mounted_dashboards

"""``gyoza ui``: a live web dashboard of a gyoza server.

A separate process and an ordinary client of the server (:class:`gyoza.client.Client`):
it renders the fleet, the runs and the definitions as HTML, keeps them live from the
server's streams (``WatchOpRun``, ``GetOpRunLogs``) and periodic list refreshes, and
offers an operator's few actions (cancel, retry, priority, drain) through the same API.
Templates and assets ship in the package; the pages need no network beyond the UI.
"""

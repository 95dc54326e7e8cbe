"""The supervision dashboard: the actor tree and the mesh of one or more nodes, live.

* :mod:`.follow`: reads a node's JSON-lines event log as it grows (rotation, truncation);
* :mod:`.view`: folds log records and status samples into what the page and ``top`` draw;
* :mod:`.status`: a node's read-only status, served at ``GET /villagemesh/status``;
* :mod:`.server`: the aiohttp page with live updates (``villagemesh dashboard``);
* :mod:`.top`: the same view in a terminal (``villagemesh top``).
"""

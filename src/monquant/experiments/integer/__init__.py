"""``monquant intdeploy``: integer iterates validated against Corollary 2 (``study``)."""

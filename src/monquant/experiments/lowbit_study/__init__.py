"""``monquant lowbit``: certified low-bit MonDEQs (``study``) and its report (``report``)."""

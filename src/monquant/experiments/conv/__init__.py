"""The convolutional MonDEQ study (``monquant conv``): the driver (``study``) and its rendering
(``report``)."""

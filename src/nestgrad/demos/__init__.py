"""The ``nestgrad`` command line and its demos (``nestgrad demo``); not part of the library's API."""

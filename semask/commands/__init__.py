"""Sub-commands of the ``semask`` CLI (one module each: ``add_arguments`` and ``run``)."""

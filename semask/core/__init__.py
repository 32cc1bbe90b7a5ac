"""Infrastructure under every model file: the registry (names, tags, conversion rules), safe reading
of weight files, Hub downloads, checked state-dict loading and the model-folder format.

Nothing here imports the model code; backbones and models import from here, and the factory
(:mod:`semask.hub.factory`) sits on top of both.
"""

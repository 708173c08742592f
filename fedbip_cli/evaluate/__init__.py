"""``fedbip evaluate``: does a merged adapter help its client? Scores (``scorer``), the paired
comparison (``stats``), the run over every client (``run``) and the picked adapters (``pick``)."""

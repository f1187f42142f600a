"""The orchestrator's web page: submit, watch and orbit jobs in a browser (see web.server)."""

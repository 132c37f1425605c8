"""Search jobs (DESIGN §10): the spec's normalization and the trials' state in the database."""
